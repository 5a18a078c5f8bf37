"""`/v1/executions/{id}/replay`, `/v1/replays` (bulk) and `/v1/backfills`: running history again.

Thin HTTP wrappers over services.replay, which the CLI uses too. Bulk replays
and backfills are idempotent operations (their ids are derived from what they
select), so a client that times out can simply send the same request again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.auth import ScopedRoute, caller, scoped
from services.gateway.errors import ApiError, errors
from services.gateway.keys import recorded_name
from services.gateway.routes_executions import IdPath, _load
from services.replay import BackfillError, ReplayError, backfill, bulk_replay, parse_filter, replay_execution
from services.triggers.webhooks import WEBHOOK_EVENT_TYPE

router = APIRouter(prefix="/v1", tags=["replay"], route_class=ScopedRoute)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplayRequest(_Body):
    from_step: str | None = Field(None, max_length=64, description="re-run this step and what follows; keep the rest")
    input_patch: dict[str, Any] | None = Field(None, description="RFC 7386 merge patch of the original input")
    version: Literal["same", "latest"] | int = "same"
    dry_run: bool = False


_NoSeparators = r"^[^,=]+$"  # the object becomes services.replay's `k=v,...` text: no separator may hide inside


class ReplayFilter(_Body):
    """What a bulk replay selects: an object, as the dead-letter routes take (`{"filter": {...}}`)."""

    workflow: str | None = Field(None, min_length=1, max_length=140, pattern=_NoSeparators,
                                 description="NAME or NAME@VERSION")
    status: Literal["running", "paused", "completed", "failed", "cancelled"] | None = None
    since: str | None = Field(None, min_length=1, max_length=64, pattern=_NoSeparators,
                              description="ISO 8601 time, or an age back from now (30m, 24h, 7d)")
    until: str | None = Field(None, min_length=1, max_length=64, pattern=_NoSeparators,
                              description="ISO 8601 time, or an age back from now; exclusive")
    version: int | None = Field(None, ge=1, le=2**31 - 1)
    limit: int | None = Field(None, ge=1, le=2**31 - 1, description="at most this many executions")

    def text(self) -> str:
        """services.replay's filter text; `workflow: W@V` is `workflow=W,version=V` (NAME@VERSION everywhere)."""
        fields = self.model_dump(exclude_none=True)
        name, sep, version = str(fields.get("workflow", "")).partition("@")
        if sep:
            if not version.isdigit() or int(version) < 1:
                raise ApiError(422, "filter.workflow: expected NAME or NAME@VERSION",
                               problems=[{"field": "body.filter.workflow", "message": "expected NAME or NAME@VERSION"}])
            if fields.get("version", int(version)) != int(version):
                raise ApiError(422, "filter: workflow's @VERSION and version disagree",
                               problems=[{"field": "body.filter.version", "message": "disagrees with workflow"}])
            fields["workflow"], fields["version"] = name, int(version)
        return ",".join(f"{k}={fields[k]}" for k in sorted(fields))


class BulkReplayRequest(ReplayRequest):
    filter: ReplayFilter = Field(description='e.g. {"workflow": "W", "status": "failed", "since": "24h"}')
    operation_id: str | None = Field(None, max_length=128)


class BackfillRequest(_Body):
    workflow: str = Field(min_length=1, max_length=128)
    version: int | None = Field(None, ge=1)
    from_: datetime = Field(alias="from")
    to: datetime
    event_type: str | None = Field(None, max_length=256)
    dry_run: bool = False
    id: str | None = Field(None, max_length=128)


def _replay_error(exc: ReplayError | BackfillError) -> ApiError:
    if getattr(exc, "code", "") == "not_found":
        return ApiError(404, str(exc))
    problems = [{"field": p.path, "message": p.message} for p in getattr(exc, "problems", [])]
    return ApiError(422, str(exc), problems=problems)


@router.post("/executions/{execution_id}/replay", status_code=201, responses=errors(404, 422),
             openapi_extra=scoped("trigger"))
def replay(
    request: Request, body: ReplayRequest, execution_id: str = IdPath,
    idempotency_key: str | None = Header(None, min_length=1, max_length=256,
                                         description="the same key replays once, however often it is sent"),
) -> Any:
    """Replay one execution as a new one (`replay_of` records where it came from)."""
    _load(request, execution_id)  # 404 unless it exists and this key may see its workflow
    try:
        return replay_execution(
            request.app.state.ctx.store, execution_id, from_step=body.from_step, input_patch=body.input_patch,
            version=body.version, dry_run=body.dry_run, idempotency_key=idempotency_key,
            executions=request.app.state.ctx.executions,  # the stack's: traced, counted, wakes the relay
        )
    except ReplayError as exc:
        raise _replay_error(exc) from None


@router.post("/replays", responses=errors(422), openapi_extra=scoped("admin"))
def replay_many(request: Request, body: BulkReplayRequest) -> Any:
    """Replay every execution a filter selects, as one idempotent operation."""
    text = body.filter.text()
    try:
        selected = parse_filter(text)
    except ReplayError as exc:
        raise _replay_error(exc) from None
    if caller(request).workflows is not None and not caller(request).can_use(selected.workflow):
        # a key bound to some workflows must name one of them: it may not replay the others'
        raise ApiError(403, "this key is bound to some workflows: the filter must name one (workflow=...)")
    try:
        return bulk_replay(
            request.app.state.ctx.store, text, from_step=body.from_step, input_patch=body.input_patch,
            version=body.version, dry_run=body.dry_run, operation_id=body.operation_id,
        )
    except ReplayError as exc:
        raise _replay_error(exc) from None


@router.post("/backfills", responses=errors(422), openapi_extra=scoped("admin"))
def backfill_(request: Request, body: BackfillRequest) -> Any:
    """Run the trigger events recorded in [from, to) through a workflow version."""
    key = caller(request)
    if not key.can_use(body.workflow):
        raise ApiError(403, f"this key may not start {body.workflow!r}")
    if body.event_type is not None and body.event_type != WEBHOOK_EVENT_TYPE and not key.can_use_event(body.event_type):
        raise ApiError(403, f"this key may not read events of type {body.event_type!r}: outside its event binding "
                            f"({', '.join(sorted(key.events or ())) or 'empty'})")
    # Every recorded event is checked too: the version may subscribe to types outside the binding
    # (published before it, or by another key), and webhook deliveries are told apart by path.
    allow = None if key.workflows is None else (lambda event: key.can_use_event(recorded_name(event)))
    try:
        return backfill(
            request.app.state.ctx.store, body.workflow, start=body.from_, end=body.to, version=body.version,
            event_type=body.event_type, dry_run=body.dry_run, backfill_id=body.id, allow=allow,
        )
    except (BackfillError, ReplayError) as exc:
        raise _replay_error(exc) from None
