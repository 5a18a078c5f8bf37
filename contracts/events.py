"""Events of an execution: past-tense, immutable, versioned.

Each event carries `schema_version`; a change to an event's fields bumps it and
`upcast` learns to read the old shape, so stored histories stay readable
(tests/golden holds recorded histories that must keep rebuilding).
Times are given to the core as arguments, never read from a clock here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = 1
    at: datetime


class ExecutionStarted(_Event):
    type: Literal["ExecutionStarted"] = "ExecutionStarted"
    workflow: str
    version: int
    content_hash: str
    definition: dict[str, Any]  # the exact definition, so a history is self-contained
    input: Any = None
    trigger: dict[str, Any] | None = None  # the CloudEvent (id, source, type) that started it
    replay_of: str | None = None
    reused: dict[str, Any] = {}  # step id -> output kept from the replayed execution
    idempotency_key: str | None = None
    trace_id: str | None = None


class StepMapped(_Event):
    """A `map` step fanned out into `count` tasks."""

    type: Literal["StepMapped"] = "StepMapped"
    step_id: str
    count: int


class StepScheduled(_Event):
    type: Literal["StepScheduled"] = "StepScheduled"
    step_id: str
    item: int | None = None
    attempt: int
    step_type: str
    config: dict[str, Any] = {}
    input: Any = None
    idempotency_key: str
    timeout: float | None = None
    not_before: datetime | None = None  # a retry waits out its backoff until then
    reason: str = "ready"  # ready | retry | reprocess (also after a Retry) | resume
    # JSON pointer (/config/..., /input/...) -> the `${{ secrets.NAME }}` template the worker puts there.
    # References only: values never reach an event (contracts/secrets.py).
    secrets: dict[str, str] = {}
    # A traced execution's W3C traceparent, and what its step spans are labelled with: the relay
    # puts them on the StepReady it publishes. Left out of the stored JSON when unset, so an
    # untraced execution's events stay as small as before.
    trace_id: str | None = Field(None, exclude_if=lambda v: v is None)
    workflow: str | None = Field(None, exclude_if=lambda v: v is None)
    workflow_version: int | None = Field(None, exclude_if=lambda v: v is None)


class StepSucceeded(_Event):
    type: Literal["StepSucceeded"] = "StepSucceeded"
    step_id: str
    item: int | None = None
    attempt: int
    output: Any = None
    worker_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reused_from: str | None = None  # execution whose recorded output a replay kept


class StepFailed(_Event):
    """One attempt failed; a retry follows unless the step is dead-lettered."""

    type: Literal["StepFailed"] = "StepFailed"
    step_id: str
    item: int | None = None
    attempt: int
    error_type: str
    error_message: str
    traceback: str | None = None
    retryable: bool = True
    next_retry_delay: float | None = None  # asked for by the handler
    worker_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class StepSkipped(_Event):
    type: Literal["StepSkipped"] = "StepSkipped"
    step_id: str
    reason: str


class StepDeadLettered(_Event):
    type: Literal["StepDeadLettered"] = "StepDeadLettered"
    step_id: str
    item: int | None = None
    attempt: int
    error_type: str
    error_message: str
    reason: str  # retries exhausted | non-retryable | input error


class StepResultIgnored(_Event):
    """A result that arrived but changed nothing: stale attempt, or a finished execution."""

    type: Literal["StepResultIgnored"] = "StepResultIgnored"
    step_id: str
    item: int | None = None
    attempt: int
    outcome: str  # succeeded | failed
    reason: str


class StepReprocessRequested(_Event):
    type: Literal["StepReprocessRequested"] = "StepReprocessRequested"
    step_id: str
    item: int | None = None
    patch: dict[str, Any] | None = None
    by: str = "user"
    why: str | None = None
    request_id: str | None = None


class ExecutionCompleted(_Event):
    type: Literal["ExecutionCompleted"] = "ExecutionCompleted"
    output: Any = None


class ExecutionFailed(_Event):
    type: Literal["ExecutionFailed"] = "ExecutionFailed"
    step_id: str | None = None
    error_type: str
    error_message: str


class ExecutionCancelled(_Event):
    type: Literal["ExecutionCancelled"] = "ExecutionCancelled"
    by: str = "user"
    why: str | None = None


class ExecutionPaused(_Event):
    type: Literal["ExecutionPaused"] = "ExecutionPaused"
    by: str = "user"
    why: str | None = None


class ExecutionResumed(_Event):
    type: Literal["ExecutionResumed"] = "ExecutionResumed"
    by: str = "user"
    why: str | None = None


class ExecutionRetried(_Event):
    """A user asked a failed execution to run its failed steps again."""

    type: Literal["ExecutionRetried"] = "ExecutionRetried"
    by: str = "user"
    why: str | None = None


Event = Annotated[
    ExecutionStarted
    | StepMapped
    | StepScheduled
    | StepSucceeded
    | StepFailed
    | StepSkipped
    | StepDeadLettered
    | StepResultIgnored
    | StepReprocessRequested
    | ExecutionCompleted
    | ExecutionFailed
    | ExecutionCancelled
    | ExecutionPaused
    | ExecutionResumed
    | ExecutionRetried,
    Field(discriminator="type"),
]

EVENT_TYPES: dict[str, type[_Event]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        ExecutionStarted,
        StepMapped,
        StepScheduled,
        StepSucceeded,
        StepFailed,
        StepSkipped,
        StepDeadLettered,
        StepResultIgnored,
        StepReprocessRequested,
        ExecutionCompleted,
        ExecutionFailed,
        ExecutionCancelled,
        ExecutionPaused,
        ExecutionResumed,
        ExecutionRetried,
    )
}
FINISHING = frozenset({"ExecutionCompleted", "ExecutionFailed", "ExecutionCancelled"})
_adapter: TypeAdapter[Any] = TypeAdapter(Event)


def encode(event: _Event) -> bytes:
    return event.__pydantic_serializer__.to_json(event)


def decode(type_name: str, data: bytes) -> Any:
    """Stored bytes to an event model, upcasting older schema versions."""
    cls = EVENT_TYPES.get(type_name)
    if cls is not None and b'"schema_version":1' in data[:80]:
        return cls.model_validate_json(data)  # the current shape: parse in one pass
    raw = orjson.loads(data)
    raw.setdefault("type", type_name)
    return _adapter.validate_python(upcast(raw))


def upcast(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring an older event shape up to the current one (none changed yet)."""
    return raw
