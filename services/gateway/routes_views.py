"""Small read endpoints the console needs and the rest of `/v1` lacked.

- `GET /v1/whoami`: the caller's scopes and bindings, so a client offers only what
  the key may do (the routes still check every request).
- `GET /v1/executions/{id}/at/{n}`: the state as of event N (`weft history --at N`).
- `GET /v1/changes`: a live SSE feed of execution status changes (started, paused,
  finished, reopened) for lists, read from the notification log by position.
- `GET /v1/stats/workflows`: counts by status, p50/p95 duration, failure rate.
- `GET /v1/projections`: each view's position, lag, rate and rebuild state.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

import orjson
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import StreamingResponse

from services.gateway.auth import OPEN, ScopedRoute, caller, is_loopback, scoped
from services.gateway.errors import ApiError, errors
from services.gateway.streams import KeyCheck, LiveStream, resume_after
from services.gateway.routes_executions import IdPath, _load, summary
from contracts.events import decode as decode_event
from services.replay.timetravel import AtError, state_at

router = APIRouter(prefix="/v1", tags=["console"], route_class=ScopedRoute)

# The events that change what an executions list shows: its status (and its existence).
CHANGES = {
    "ExecutionStarted": "running", "ExecutionCompleted": "completed", "ExecutionFailed": "failed",
    "ExecutionCancelled": "cancelled", "ExecutionPaused": "paused", "ExecutionResumed": "running",
    "ExecutionRetried": "running", "StepReprocessRequested": "running",
}


@router.get("/whoami", responses=errors(), openapi_extra=scoped("read"))
def whoami(request: Request) -> Any:
    """This key: its id, scopes (with what they imply) and bindings; `auth: false` when the gateway takes no keys."""
    key = caller(request)
    ctx = request.app.state.ctx
    host = request.url.hostname or ""
    return {
        "auth": ctx.auth.enabled, "key_id": None if key is OPEN else key.key_id, "name": key.name,
        "scopes": sorted(s for s in ("read", "trigger", "admin") if key.allows(s)),
        "workflows": None if key.workflows is None else sorted(key.workflows),
        "events": None if key.events is None else sorted(key.events),
        "loopback": is_loopback(host),
    }


@router.get("/executions/{execution_id}/at/{n}", responses=errors(404), openapi_extra=scoped("read"))
def as_of(request: Request, execution_id: str = IdPath, n: int = Path(ge=1, le=2**31)) -> Any:
    """The execution's state as of event `n` (1-based), with every attempt so far: `weft history --at N`."""
    current = _load(request, execution_id)
    # The first n events only: a slider dragged over a long history reads what it shows, not all of it.
    records = request.app.state.ctx.store.load(uuid.UUID(execution_id), upto_version=n)
    history = [decode_event(r.type, r.data) for r in records]
    try:
        state, folded, attempts = state_at(execution_id, history, n)
    except AtError as exc:
        raise ApiError(404 if exc.code == 1 else 422, str(exc).replace("--at", "path.n")) from None
    return summary(state) | {"as_of": folded, "of": max(current.version, len(history)), "attempts": attempts}


@router.get(
    "/changes", openapi_extra=scoped("read"), response_class=StreamingResponse,
    responses={**errors(), 200: {"description": "Server-Sent Events: `id: <position>`, `event: change`, `data: "
                                 "{execution_id, workflow, status, type, at}`",
                                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def changes(
    request: Request,
    last_event_id: str | None = Header(None, max_length=32, description="resume after this position"),
    after: int | None = Query(None, ge=0, le=2**62, description="log position to start after (default: now)"),
) -> Any:
    """Execution status changes as they are recorded, for live lists (of the workflows this key may see).
    Resume with `Last-Event-ID` (the last `id:` received). At most WEFT_GATEWAY_MAX_STREAMS live streams
    are open on a gateway at once (503 with Retry-After beyond)."""
    ctx = request.app.state.ctx
    resumed = resume_after(last_event_id)
    if resumed is not None:
        after = resumed
    if after is None:
        after = await asyncio.to_thread(ctx.store.head)
    return LiveStream(ctx, _follow(request, after), "/v1/changes", caller(request).key_id)


async def _follow(request: Request, position: int) -> AsyncIterator[bytes]:
    ctx = request.app.state.ctx
    key = caller(request)
    workflows: dict[str, str] = {}  # execution id -> workflow, for events that do not name it
    beat = time.monotonic()
    yield b": connected\n\n"
    check = KeyCheck(request)
    while not ctx.stop.is_set():
        if await check.revoked():
            return  # revoked while open: the reconnect gets 401
        records, nxt = await asyncio.to_thread(ctx.store.follow, position, 500, tuple(CHANGES))
        for rec in records:
            eid = str(rec.stream_id)
            data = orjson.loads(rec.data)
            workflow = data.get("workflow") or workflows.get(eid)
            if workflow is None:
                state = await asyncio.to_thread(ctx.executions.load, eid)
                workflow = state.workflow
            workflows[eid] = workflow
            if len(workflows) > 10_000:
                workflows.clear()
            if not key.can_use(workflow):
                continue
            item = {"execution_id": eid, "workflow": workflow, "status": CHANGES[rec.type], "type": rec.type,
                    "at": data.get("at"), "seq": rec.version}
            yield f"id: {rec.position}\nevent: change\ndata: ".encode() + orjson.dumps(item) + b"\n\n"
            beat = time.monotonic()
        position = max(position, nxt)
        if time.monotonic() - beat > ctx.sse_heartbeat:
            # Nothing this key may see for a while (other workflows' changes are skipped): say the
            # position anyway, so a reconnect resumes here (an id without data dispatches nothing).
            beat = time.monotonic()
            yield f"id: {position}\n\n".encode() if position else b": keep-alive\n\n"
        if await request.is_disconnected():
            return
        if len(records) >= 500:
            continue  # catching up: no pause
        try:
            await asyncio.wait_for(ctx.stop.wait(), timeout=max(ctx.sse_poll, 0.25))
        except asyncio.TimeoutError:
            pass


@router.get("/stats/workflows", responses=errors(), openapi_extra=scoped("read"))
def workflow_stats(request: Request, workflow: str | None = Query(None, max_length=128)) -> Any:
    """Per workflow: executions by status, p50/p95 duration of completed ones (ms), failure rate."""
    from services.projections import workflow_stats as read_stats
    from services.projections.tables import table_exists

    key = caller(request)
    if workflow is not None and not key.can_use(workflow):
        return {"items": []}
    with request.app.state.ctx.store.reader() as tx:
        rows = read_stats(tx, workflow) if table_exists(tx, "weft_workflow_stats") else []
    return {"items": [r for r in rows if key.can_use(r["workflow"])]}


@router.get("/projections", responses=errors(), openapi_extra=scoped("read"))
def projections(request: Request) -> Any:
    """Each status view: position, head, lag, events/s, and the rebuild in progress if any."""
    from services.projections import default_views, projection_status

    return {"items": projection_status(request.app.state.ctx.store, default_views())}



_REBUILDS: dict[str, asyncio.Task[Any]] = {}  # name -> the running rebuild (kept so it is not collected)
REBUILD_ANSWER_WAIT = 2.0  # seconds the POST waits to know the rebuild holds the view's claim


@router.post("/projections/{name}/rebuild", status_code=202, responses=errors(404, 409), openapi_extra=scoped("admin"))
async def rebuild_projection(request: Request, name: str = Path(max_length=64, pattern=r"^[a-z_:]+$")) -> Any:
    """Rebuild a view from position 0 beside the live one, then swap it in. Answers 202 once the
    rebuild holds the view (at most 2 s), 409 while another rebuild of it runs here or elsewhere.
    Its progress shows in `GET /v1/projections` (`rebuilding`: position of head), and `last` here."""
    from services.projections import RebuildBusy, rebuild, view_named

    key = caller(request)
    if key.workflows is not None:
        raise ApiError(403, "a view covers every workflow: a key bound to some workflows may not rebuild it")
    try:
        view = view_named(name)
    except KeyError as exc:
        raise ApiError(404, str(exc.args[0])) from None
    running = _REBUILDS.get(view.name)
    if running is not None and not running.done():
        raise ApiError(409, f"{view.name} is being rebuilt already", code="busy")
    store = request.app.state.ctx.store
    loop = asyncio.get_running_loop()
    underway = asyncio.Event()

    def progress(position: int, head: int) -> None:  # from the rebuild's thread: it holds the claim now
        loop.call_soon_threadsafe(underway.set)

    async def run() -> Any:
        return (await asyncio.to_thread(rebuild, store, view, progress=progress)).as_dict()

    task = _REBUILDS[view.name] = asyncio.ensure_future(run())  # set before any await: two requests, one rebuild
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read here or by GET .../rebuild
    # Another gateway (or `weft projections rebuild`) may hold the view's claim in the store: wait
    # until ours is under way or refused, so the answer is 409 then and not a 202 that fails later.
    waiting = asyncio.ensure_future(underway.wait())
    await asyncio.wait([task, waiting], timeout=REBUILD_ANSWER_WAIT, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task.done() and isinstance(task.exception(), RebuildBusy):
        raise ApiError(409, str(task.exception()), code="busy")
    return {"name": view.name, "started": True}


@router.get("/projections/{name}/rebuild", responses=errors(404), openapi_extra=scoped("read"))
def rebuild_state(name: str = Path(max_length=64, pattern=r"^[a-z_:]+$")) -> Any:
    """The last rebuild this gateway started of a view: running, or its result."""
    wanted = name if name.startswith("view:") else f"view:{name}"
    task = _REBUILDS.get(wanted)
    if task is None:
        raise ApiError(404, f"no rebuild of {wanted} started here")
    if not task.done():
        return {"name": wanted, "running": True}
    exc = task.exception()
    return {"name": wanted, "running": False, "result": None if exc else task.result(),
            "error": f"{type(exc).__name__}: {exc}" if exc else None}
