"""Broker messages: commands to workers and results back to the orchestrator.

Both carry a deterministic message id, so the broker drops the duplicates that
redelivery and relay restarts produce.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from contracts.events import StepScheduled


def task_key(execution_id: str, step_id: str, item: int | None) -> str:
    return f"{execution_id}:{step_id}" if item is None else f"{execution_id}:{step_id}#{item}"


class StepReady(BaseModel):
    """Run one attempt of one task (a step, or one item of a map step)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = 1
    execution_id: str
    workflow: str  # the workflow's name ("" only for a step scheduled before events carried it)
    workflow_version: int | None = None
    step_id: str
    item: int | None = None
    attempt: int
    step_type: str
    config: dict[str, Any] = {}
    input: Any = None
    idempotency_key: str
    timeout: float | None = None
    not_before: datetime | None = None
    scheduled_at: datetime
    trace_id: str | None = None
    # Where config/input hold secret references (JSON pointer -> template); the worker resolves them.
    secrets: dict[str, str] = {}

    @property
    def message_id(self) -> str:
        return f"{task_key(self.execution_id, self.step_id, self.item)}:{self.attempt}"

    def encode(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


def ready_from_scheduled(execution_id: str, scheduled: StepScheduled) -> StepReady:
    """The command for a stored `StepScheduled`: the one place a StepReady is made from an event.

    `model_construct`: the event was validated when it was decided and again when it was read
    back, and every field here is copied from it, so validating once more would only cost time
    on the hottest path there is (one call per step).
    """
    return StepReady.model_construct(
        schema_version=1, execution_id=execution_id, workflow=scheduled.workflow or "",
        workflow_version=scheduled.workflow_version, step_id=scheduled.step_id, item=scheduled.item,
        attempt=scheduled.attempt, step_type=scheduled.step_type, config=scheduled.config, input=scheduled.input,
        idempotency_key=scheduled.idempotency_key, timeout=scheduled.timeout, not_before=scheduled.not_before,
        scheduled_at=scheduled.at, trace_id=scheduled.trace_id, secrets=scheduled.secrets,
    )


class StepError(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str
    message: str
    traceback: str | None = None
    non_retryable: bool = False
    next_retry_delay: float | None = None


class StepResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = 1
    execution_id: str
    step_id: str
    item: int | None = None
    attempt: int
    status: Literal["succeeded", "failed"]
    output: Any = None
    error: StepError | None = None
    worker_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    scheduled_at: datetime | None = None  # copied from StepReady, for dispatch latency

    @property
    def message_id(self) -> str:
        return f"{task_key(self.execution_id, self.step_id, self.item)}:{self.attempt}:result"

    def encode(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


class MessageError(ValueError):
    """A broker message that cannot be decoded or fails its schema."""


def decode_result(data: bytes) -> StepResult:
    try:
        return StepResult.model_validate_json(data)
    except ValueError as exc:
        raise MessageError(f"undecodable StepResult: {exc}") from None


def decode_ready(data: bytes) -> StepReady:
    try:
        return StepReady.model_validate_json(data)
    except ValueError as exc:
        raise MessageError(f"undecodable StepReady: {exc}") from None


def task_of(message_id: str | None) -> tuple[str, str, int | None, int] | None:
    """(execution, step, item, attempt) from the message id of a StepReady
    (`<execution>:<step>[#item]:<attempt>`) or a StepResult (the same, then `:result`):
    who a message is about, without decoding its body. None for any other id."""
    if not message_id:
        return None
    if message_id.endswith(":result"):
        message_id = message_id[: -len(":result")]
    key, _, attempt = message_id.rpartition(":")
    execution_id, _, step = key.partition(":")
    step_id, hash_, item = step.partition("#")
    if not execution_id or not step_id:
        return None
    try:
        return execution_id, step_id, (int(item) if hash_ else None), int(attempt)
    except ValueError:
        return None
