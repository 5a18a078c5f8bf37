"""Starting executions: `POST /v1/executions` (one) and `POST /v1/executions:batch` (many).

Both take the async path: the request queues its items on the gateway's group
commit (services/orchestrator/starts.py), which stores whatever concurrent
requests queued meanwhile in one transaction. With tracing on, a single start
takes the traced path instead (one span per start, as before).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Header, Request, Response

from services.gateway.auth import ScopedRoute, caller, scoped
from services.gateway.errors import ApiError, errors
from services.gateway.models import BatchStartOut, BatchStartRequest, ExecutionOut, StartRequest
from services.gateway.routes_executions import summary
from services.orchestrator.starts import GroupCommit, StartItem, Started, start_batch
from services.telemetry import metrics, tracing

router = APIRouter(prefix="/v1/executions", tags=["executions"], route_class=ScopedRoute)


def group_commit(request: Request) -> GroupCommit:
    ctx = request.app.state.ctx
    gc = getattr(ctx, "starts", None)
    if gc is None:
        def flush(items: list[StartItem]) -> list[Started]:
            return start_batch(ctx.executions, ctx.registry, items)
        gc = ctx.starts = GroupCommit(flush)
    return gc


def _count(outcomes: list[Started]) -> None:
    for o in outcomes:
        if o.status == 201:
            metrics.EXECUTIONS_STARTED.labels(o.workflow).inc()


@router.post("", status_code=201, response_model=ExecutionOut, openapi_extra=scoped("trigger"),
             responses={**errors(404, 409), 200: {"model": ExecutionOut,
                                                  "description": "The Idempotency-Key named an existing execution"}})
async def start(
    request: Request, response: Response, body: StartRequest,
    idempotency_key: str | None = Header(None, min_length=1, max_length=256,
                                         description="the same key starts one execution of a workflow, ever"),
) -> Any:
    """Start an execution. With an `Idempotency-Key`, repeating the request returns the same execution (200)."""
    if not caller(request).can_use(body.workflow):
        raise ApiError(403, f"this key may not use workflow {body.workflow!r}")
    item = StartItem(body.workflow, body.input, body.version, idempotency_key, tracing.incoming.get())
    if tracing.enabled():  # a span per start, made (and counted) by ObservedExecutions.start
        [out] = await asyncio.to_thread(_traced_start, request, item)
    else:
        [out] = await group_commit(request).submit([item])
        _count([out])
    if out.status >= 300:
        problems = [dict(p) for p in out.problems]
        raise ApiError(out.status, out.message, code=out.code if out.status != 422 else None, problems=problems)
    assert out.state is not None
    response.status_code = out.status
    return summary(out.state) | {"created": out.status == 201}


def _traced_start(request: Request, item: StartItem) -> list[Started]:
    from services.orchestrator.executions import InputError
    from services.orchestrator.registry import UnknownWorkflow

    ctx = request.app.state.ctx
    try:
        version = ctx.registry.get(item.workflow, item.version)
    except UnknownWorkflow as exc:
        return [Started(404, code="not_found", message=str(exc))]
    try:
        state, created = ctx.executions.start(version, item.input, idempotency_key=item.idempotency_key)
    except InputError as exc:
        return [Started(422, code="invalid", message=str(exc), problems=[
            {"field": f"body.{p.path}".rstrip("."), "message": p.message} for p in exc.problems])]
    if not created and not ctx.executions.claims.same(state.input, item.input):
        return [Started(409, state.id, code="idempotency_conflict",
                        message="this Idempotency-Key already started an execution with a different input")]
    return [Started(201 if created else 200, state.id, state, workflow=version.name)]


@router.post(":batch", response_model=BatchStartOut, openapi_extra=scoped("trigger"), responses=errors(413, 422))
async def start_batch_(request: Request, body: BatchStartRequest) -> Any:
    """Start many executions in one request and one transaction. Each item has its own
    `idempotency_key` and its own outcome (`status`: 201 started, 200 the key's existing
    execution, 403, 404, 409 the key started one with a different input, 413, 422). A request
    that is refused as a whole (over MAX_BATCH items, a malformed item: 422 naming the field)
    stores nothing."""
    key = caller(request)
    allowed = [i for i, it in enumerate(body.items) if key.can_use(it.workflow)]
    items = [StartItem(body.items[i].workflow, body.items[i].input, body.items[i].version,
                       body.items[i].idempotency_key, tracing.incoming.get()) for i in allowed]
    stored = await group_commit(request).submit(items) if items else []
    _count(stored)
    by_index = dict(zip(allowed, stored))
    out = []
    for i, it in enumerate(body.items):
        o = by_index.get(i)
        if o is None:
            out.append({"index": i, "status": 403, "idempotency_key": it.idempotency_key, "error": {
                "code": "forbidden", "message": f"this key may not use workflow {it.workflow!r}"}})
        elif o.status < 300:
            assert o.state is not None
            out.append({"index": i, "status": o.status, "idempotency_key": it.idempotency_key,
                        "execution_id": o.execution_id, "created": o.status == 201,
                        "execution": summary(o.state, steps=False)})
        else:
            problems = [{"field": p["field"].replace("body.", f"body.items[{i}].", 1), "message": p["message"]}
                        for p in o.problems]
            out.append({"index": i, "status": o.status, "idempotency_key": it.idempotency_key,
                        "execution_id": o.execution_id,
                        "error": {"code": o.code, "message": o.message, "problems": problems}})
    return {"items": out, "started": sum(1 for o in out if o["status"] == 201),
            "existing": sum(1 for o in out if o["status"] == 200),
            "failed": sum(1 for o in out if o["status"] >= 300)}
