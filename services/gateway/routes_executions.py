"""`/v1/executions`: start, get, list, control (cancel, pause, resume, retry), history, live events (SSE)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, AsyncIterator

import orjson
from fastapi import APIRouter, Body, Header, Path, Query, Request
from fastapi.responses import StreamingResponse

from contracts.events import FINISHING
from services.gateway.auth import ScopedRoute, caller, scoped, who
from services.gateway.errors import ApiError, errors, invalid
from services.gateway.models import ControlRequest, ExecutionOut, ExecutionPage, HistoryOut, Status
from services.gateway.streams import KeyCheck, LiveStream, resume_after
from services.orchestrator.decide import Cancel, DecisionError, Pause, Resume, Retry
from services.orchestrator.executions import NotFound
from services.orchestrator.state import Execution
from services.orchestrator.state import summary as execution_summary
from services.projections.executions import list_executions

router = APIRouter(prefix="/v1/executions", tags=["executions"], route_class=ScopedRoute)
IdPath = Path(description="execution id (a UUID)", max_length=64)
_ID_PREFIX = re.compile(r"[0-9a-fA-F-]{1,36}")
STREAM_PAGE = 1000  # events read per poll of a live stream
_REOPENING = frozenset({"ExecutionRetried", "StepReprocessRequested", "ExecutionResumed"})


def summary(state: Execution, *, steps: bool = True) -> dict[str, Any]:
    return execution_summary(state, steps=steps) | {"input": state.input, "trigger": state.trigger}


def _load(request: Request, execution_id: str) -> Execution:
    """The execution, or 404 when it does not exist or the key may not see its workflow."""
    try:
        uuid.UUID(execution_id)
    except ValueError:
        raise ApiError(404, f"no execution {execution_id!r}") from None
    state = request.app.state.ctx.executions.load(execution_id)
    if not state.version or not caller(request).can_use(state.workflow):
        raise ApiError(404, f"no execution {execution_id!r}")
    return state


def _time(name: str, raw: str | None) -> str | None:
    """An RFC 3339 time (a bare number is not one: no guessing at epoch units)."""
    if raw is None:
        return None
    try:
        if not raw[:4].isdigit() or "-" not in raw:
            raise ValueError(raw)
        value = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise invalid(f"query.{name}", "not an RFC 3339 time, e.g. 2024-05-01T12:00:00Z") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def _cursor(raw: str | None) -> tuple[str, str] | None:
    if not raw:
        return None
    try:
        at, _, eid = base64.urlsafe_b64decode(raw.encode() + b"=" * (-len(raw) % 4)).decode().partition("|")
        if str(uuid.UUID(eid)) != eid:  # as the page wrote it, not `urn:uuid:...` or `{...}`: compared as text
            raise ValueError(eid)
        datetime.fromisoformat(at)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid("query.cursor", "not a cursor from a previous page") from None
    return at, eid


@router.get("", response_model=ExecutionPage, responses=errors(), openapi_extra=scoped("read"))
def list_(
    request: Request,
    workflow: str | None = Query(None, max_length=128),
    status: Status | None = Query(None),
    since: str | None = Query(None, max_length=64, description="started at or after (RFC 3339 time)"),
    until: str | None = Query(None, max_length=64, description="started before (RFC 3339 time)"),
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=512, description="next_cursor of the previous page"),
    id: str | None = Query(None, max_length=36, description="execution ids that start with this (hex digits, dashes)"),
) -> Any:
    """Executions, newest first, from the executions view (which trails the log by a moment)."""
    ctx = request.app.state.ctx
    if id is not None and not _ID_PREFIX.fullmatch(id):
        raise invalid("query.id", "the start of an execution id: hex digits and dashes, at most 36")
    key = caller(request)
    bound = sorted(key.workflows) if key.workflows is not None else None
    if workflow is not None and bound is not None and workflow not in bound:
        return {"items": [], "next_cursor": None}
    with ctx.store.reader() as tx:  # not the writer: on SQLite a list never waits for ingestion
        rows = list_executions(
            tx, workflow=workflow, status=status, limit=limit + 1, workflows=bound, after=_cursor(cursor),
            since=_time("since", since), until=_time("until", until), id_prefix=id,
        )
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = None
    if more:
        last = rows[-1]
        nxt = base64.urlsafe_b64encode(f"{last['started_at']}|{last['id']}".encode()).decode().rstrip("=")
    return {"items": rows, "next_cursor": nxt}


@router.get("/{execution_id}", response_model=ExecutionOut, responses=errors(404), openapi_extra=scoped("read"))
def get(request: Request, execution_id: str = IdPath) -> Any:
    """One execution, with the state of every step."""
    return summary(_load(request, execution_id))


def _control(request: Request, execution_id: str, command: type, body: ControlRequest | None) -> dict[str, Any]:
    """Record a control command by this caller (with its optional `why`) and answer the new state."""
    ctx = request.app.state.ctx
    _load(request, execution_id)
    cmd = command(by=who(caller(request)), why=body.why if body else None)
    try:
        events = ctx.executions.command(execution_id, cmd)
    except NotFound as exc:
        raise ApiError(404, str(exc)) from None
    except DecisionError as exc:
        raise ApiError(409, str(exc), code=exc.code) from None
    return summary(ctx.executions.load(execution_id)) | {"applied": [e.type for e in events]}


_CONTROL = dict(response_model=ExecutionOut, responses=errors(404, 409), openapi_extra=scoped("admin"))
_WHY = Body(None, description="optional: {\"why\": \"...\"}, recorded with the event")


@router.post("/{execution_id}/cancel", **_CONTROL)
def cancel(request: Request, execution_id: str = IdPath, body: ControlRequest | None = _WHY) -> Any:
    """Cancel (recorded as an event). Results that arrive afterwards are ignored, and recorded as ignored."""
    return _control(request, execution_id, Cancel, body)


@router.post("/{execution_id}/pause", **_CONTROL)
def pause(request: Request, execution_id: str = IdPath, body: ControlRequest | None = _WHY) -> Any:
    """Stop scheduling new steps; steps already running finish."""
    return _control(request, execution_id, Pause, body)


@router.post("/{execution_id}/resume", **_CONTROL)
def resume(request: Request, execution_id: str = IdPath, body: ControlRequest | None = _WHY) -> Any:
    """Resume a paused execution: schedule what became ready meanwhile."""
    return _control(request, execution_id, Resume, body)


@router.post("/{execution_id}/retry", **_CONTROL)
def retry(request: Request, execution_id: str = IdPath, body: ControlRequest | None = _WHY) -> Any:
    """Run a failed execution's failed steps again, keeping the successful outputs."""
    return _control(request, execution_id, Retry, body)


def _history_items(records: list[Any]) -> list[dict[str, Any]]:
    items = []
    for rec in records:
        e = orjson.loads(rec.data)
        e.setdefault("type", rec.type)
        items.append({"seq": rec.version, **e})
    return items


@router.get("/{execution_id}/history", response_model=HistoryOut, responses=errors(404), openapi_extra=scoped("read"))
def history(
    request: Request, execution_id: str = IdPath,
    after: int = Query(0, ge=0, le=2**31, description="only events with seq > after"),
    limit: int = Query(1000, ge=1, le=10_000),
) -> Any:
    """The execution's events in order, each with its `seq` (1-based)."""
    _load(request, execution_id)
    records = request.app.state.ctx.store.load(uuid.UUID(execution_id), after_version=after, upto_version=after + limit)
    return {"execution_id": execution_id, "items": _history_items(records)}


@router.get(
    "/{execution_id}/events", openapi_extra=scoped("read"), response_class=StreamingResponse,
    responses={**errors(404), 200: {"description": "Server-Sent Events: `id: <seq>`, `event: <type>`, `data: <event JSON>`;"
                                    " a final `event: end` once the execution has finished",
                                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def events(
    request: Request, execution_id: str = IdPath,
    last_event_id: str | None = Header(None, max_length=32, description="resume after this seq"),
    after: int = Query(0, ge=0, le=2**31, description="start after this seq"),
) -> Any:
    """A live stream of the execution's events (SSE). It ends when the execution has finished.
    At most WEFT_GATEWAY_MAX_STREAMS live streams are open on a gateway at once (503 with Retry-After beyond)."""
    state = await asyncio.to_thread(_load, request, execution_id)
    resumed = resume_after(last_event_id)
    if resumed is not None:
        after = max(after, resumed)
    return LiveStream(request.app.state.ctx, _stream(request, execution_id, after, state.finished),
                      f"/v1/executions/{execution_id}/events", caller(request).key_id)


async def _stream(request: Request, execution_id: str, seq: int, finished: bool) -> AsyncIterator[bytes]:
    ctx = request.app.state.ctx
    stream_id = uuid.UUID(execution_id)
    beat = time.monotonic()
    check = KeyCheck(request)
    while not ctx.stop.is_set():
        if await check.revoked():
            return  # revoked while open: the reconnect gets 401
        # a page at a time: a long history is not read into memory whole for each subscriber
        records = await asyncio.to_thread(ctx.store.load, stream_id, seq, seq + STREAM_PAGE)
        for item in _history_items(records):
            seq = item["seq"]
            if item["type"] in FINISHING:
                finished = True
            elif item["type"] in _REOPENING:
                finished = False
            yield f"id: {seq}\nevent: {item['type']}\ndata: ".encode() + orjson.dumps(item) + b"\n\n"
        if records:
            beat = time.monotonic()
        elif finished:
            yield b"event: end\ndata: {}\n\n"
            return
        elif time.monotonic() - beat > ctx.sse_heartbeat:
            beat = time.monotonic()
            yield b": keep-alive\n\n"
        if await request.is_disconnected():
            return
        if len(records) >= STREAM_PAGE:
            continue  # more is waiting: no pause
        try:
            await asyncio.wait_for(ctx.stop.wait(), timeout=ctx.sse_poll)
        except asyncio.TimeoutError:
            pass
