"""Request and response bodies of the HTTP API (they are its OpenAPI schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from contracts.triggers import CloudEvent

Status = Literal["running", "paused", "completed", "failed", "cancelled"]


class Problem(BaseModel):
    field: str
    message: str
    line: int | None = None


class ErrorDetail(BaseModel):
    code: str  # unauthorized | forbidden | not_found | too_large | invalid | conflict | unavailable | internal ...
    message: str
    problems: list[Problem] = []
    error_id: str | None = None  # quote it when asking about a 500: the server log has the details


class ErrorBody(BaseModel):
    error: ErrorDetail


# ---- workflows -----------------------------------------------------------------------------------


class WorkflowVersionOut(BaseModel):
    id: str  # name@version
    workflow: str
    version: int
    content_hash: str
    published_at: datetime
    created: bool | None = None  # on publish: False when identical content was already published
    definition: dict[str, Any] | None = None
    warnings: list[str] = []  # on publish: e.g. python callables this stack's worker would refuse


class WorkflowList(BaseModel):
    items: list[WorkflowVersionOut]


# ---- executions ----------------------------------------------------------------------------------


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workflow: str = Field(min_length=1, max_length=128)
    version: int | None = Field(None, ge=1, description="default: the latest version")
    input: Any = Field(default_factory=dict)


class BatchStartItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workflow: str = Field(min_length=1, max_length=128)
    version: int | None = Field(None, ge=1, description="default: the latest version")
    input: Any = Field(default_factory=dict)
    idempotency_key: str | None = Field(None, min_length=1, max_length=256,
                                        description="the same key starts one execution of a workflow, ever")


MAX_BATCH = 1000  # items in one POST /v1/executions:batch


class BatchStartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[BatchStartItem] = Field(min_length=1, description=f"at most {MAX_BATCH}")

    @field_validator("items", mode="before")
    @classmethod
    def _at_most(cls, value: Any) -> Any:
        # Counted before any item is parsed: an oversize batch costs no model per item.
        if isinstance(value, list) and len(value) > MAX_BATCH:
            raise ValueError(f"a batch holds at most {MAX_BATCH} items; this one has {len(value)} "
                             "(split it into several requests)")
        return value


class BatchItemError(BaseModel):
    code: str
    message: str
    problems: list[Problem] = []


class BatchStartItemOut(BaseModel):
    index: int
    status: int  # 201 started | 200 the key's existing execution | 403 | 404 | 409 | 413 | 422 | 503
    idempotency_key: str | None = None
    execution_id: str | None = None
    created: bool | None = None
    execution: dict[str, Any] | None = None
    error: BatchItemError | None = None


class BatchStartOut(BaseModel):
    items: list[BatchStartItemOut]
    started: int
    existing: int
    failed: int


class ControlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    why: str | None = Field(None, max_length=2000)


class StepOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    step_id: str
    status: str


class ErrorInfo(BaseModel):
    step_id: str | None = None
    type: str
    message: str


class ExecutionOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    execution_id: str
    status: str
    workflow: str
    version: int
    output: Any = None
    error: ErrorInfo | None = None
    started_at: str | None = None
    finished_at: str | None = None
    replay_of: str | None = None
    events: int
    duration_ms: float | None = None
    input: Any = None
    trigger: dict[str, Any] | None = None
    steps: list[StepOut] | None = None
    created: bool | None = None  # on start: False when the Idempotency-Key named an existing execution
    applied: list[str] | None = None  # on cancel/pause/resume/retry: the events recorded


class ExecutionRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    execution_id: str
    workflow: str
    version: int
    status: str
    started_at: str
    finished_at: str | None = None


class ExecutionPage(BaseModel):
    items: list[ExecutionRow]
    next_cursor: str | None = None


class HistoryEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    seq: int
    type: str
    at: str


class HistoryOut(BaseModel):
    execution_id: str
    items: list[HistoryEvent]


# ---- triggers ------------------------------------------------------------------------------------


class TriggerIn(CloudEvent):
    """A CloudEvent to publish. `id` and `source` may be left out: a fresh id, and `weft:api`."""

    id: str | None = Field(None, min_length=1, max_length=256)  # type: ignore[assignment]
    source: str | None = Field(None, min_length=1, max_length=1024)  # type: ignore[assignment]

    @field_validator("time", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError("must be an RFC 3339 time string")
        return value


class TriggerOut(BaseModel):
    id: str
    source: str
    type: str
    topic: str
    duplicate: bool  # the broker already had this (source, id): nothing new was published


class TriggerItemOut(BaseModel):
    """One event of a batch: `status` is what a request holding only it would have got."""

    index: int  # its position in the batch
    status: int  # 202 accepted | 403 the key may not publish its type | 413 data too large | 422 invalid
    id: str | None = None
    source: str | None = None
    type: str | None = None
    topic: str | None = None
    duplicate: bool | None = None  # the broker already had this (source, id)
    error: ErrorDetail | None = None


class TriggerBatchOut(BaseModel):
    """The answer to a batch (`application/cloudevents-batch+json`): 202 when every event was
    accepted, 207 when some were not (each item says why)."""

    accepted: int
    rejected: int
    items: list[TriggerItemOut]


class TriggerTypeWorkflow(BaseModel):
    name: str
    version: int
    input_schema: dict[str, Any] | None = None  # JSON Schema of the data an event of this type must carry
    # An event starts the workflow only if it matches one of these (services/triggers/routing.py); none: every event
    filters: list[dict[str, Any]] = []


class TriggerType(BaseModel):
    type: str  # the CloudEvent `type`
    topic: str  # where it is published (weft.triggers.<type>)
    workflows: list[TriggerTypeWorkflow]


class TriggerTypeList(BaseModel):
    items: list[TriggerType]


class WebhookOut(BaseModel):
    id: str
    source: str
    duplicate: bool  # this delivery id was seen before: nothing new was started
    deduplicated: bool  # False: the request had no delivery id, so a retry would start again
    executions: dict[str, str]
    rejected: dict[str, str] = {}


# ---- keys ----------------------------------------------------------------------------------------


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scopes: list[Literal["read", "trigger", "admin"]] = Field(min_length=1)
    workflows: list[str] | None = Field(None, min_length=1, max_length=1000)
    name: str | None = Field(None, max_length=200)
    # Event types (and `webhook:/path`s) a bound key may subscribe its workflows to and backfill.
    events: list[str] | None = Field(None, min_length=1, max_length=1000)


class KeyOut(BaseModel):
    id: str
    prefix: str
    scopes: list[str]
    workflows: list[str] | None = None
    events: list[str] | None = None
    name: str | None = None
    created_at: str
    revoked_at: str | None = None
    active: bool
    key: str | None = None  # only in the answer to its creation


class KeyList(BaseModel):
    items: list[KeyOut]


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str


# ---- dead letters --------------------------------------------------------------------------------


class DeadLetterOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    kind: str  # see contracts.deadletters: STEP_KINDS, MESSAGE_KINDS
    status: str  # open | reprocessed | discarded
    source: str  # step | message
    workflow: str | None = None
    execution_id: str | None = None
    step_id: str | None = None
    item: int | None = None
    attempt: int | None = None
    error_type: str | None = None
    error_message: str | None = None
    reason: str | None = None
    delivered: int = 0
    source_subject: str | None = None
    first_seen: str
    last_seen: str
    actor: str | None = None  # who reprocessed or discarded it
    action_reason: str | None = None
    acted_at: str | None = None


class DeadLetterPage(BaseModel):
    items: list[DeadLetterOut]
    next_offset: int | None = None  # the offset of the next page; None on the last one


class ErrorCluster(BaseModel):
    id: str
    count: int
    kind: str
    error_type: str
    error: str  # the message with ids, numbers and quoted values masked
    workflows: list[str]
    steps: list[str]
    statuses: list[str]
    first_seen: str
    last_seen: str
    example: str
    ids: list[str]


class ErrorClusters(BaseModel):
    groups: list[ErrorCluster]
    truncated: bool  # more dead letters matched than were grouped


class DeadLetterDetail(DeadLetterOut):
    payload: Any = None  # parsed when it is JSON text; base64 text when payload_encoding is base64
    payload_encoding: str
    headers: dict[str, str] = {}
    traceback: str | None = None
    details: dict[str, Any] = {}
    history: list[dict[str, Any]]  # the execution's events around the failure ([] without one)
    acts: list[dict[str, Any]]  # the dead letter's own stream: how it was recorded, what was done about it


class DeadLetterOutcome(BaseModel):
    id: str
    outcome: str  # reprocessed | republished | discarded | already_reprocessed | already_discarded
    #             | would_reprocess | would_republish | would_discard | failed | cancelled
    kind: str
    execution_id: str | None = None
    step_id: str | None = None
    detail: str = ""
    attempt: int | None = None  # the new attempt a step reprocess scheduled
    preview: Any = None  # dry run: the input or payload that would go out


class DeadLetterActions(BaseModel):
    ok: bool  # False when some dead letter failed (see its outcome)
    dry_run: bool
    counts: dict[str, int]  # outcome -> how many
    outcomes: list[DeadLetterOutcome]


class OpenCount(BaseModel):
    id: str  # kind/workflow
    kind: str
    workflow: str | None = None
    count: int


class DeadLetterStats(BaseModel):
    open: list[OpenCount]
    by_status: dict[str, int]
