"""The FastAPI application: `/v1` routes, `/healthz`, `/readyz`, `/v1/openapi.json`, `/v1/docs`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from contracts.payloads import PayloadLimits
from services.broker import Transport
from services.deadletters.view import FreshView
from services.gateway import errors
from services.gateway.auth import Authenticator
from services.gateway.bodies import checked_request
from services.gateway.keys import Keys
from services.gateway.models import Health
from services.orchestrator.executions import Executions
from services.orchestrator.registry import Registry
from services.store import EventStore
from services.triggers.ingest import Ingestor
from services.triggers.routing import Catalog

DEFAULT_MAX_BODY = 1024 * 1024


@dataclass
class Context:
    """What the routes use; one per gateway."""

    store: EventStore
    transport: Transport
    executions: Executions
    catalog: Catalog
    ingestor: Ingestor
    keys: Keys
    auth: Authenticator
    registry: Registry = field(init=False)
    dead_letters: FreshView = field(init=False)  # caught up before each dead-letter read
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sse_poll: float = 0.25
    webhook_tolerance: float = 300.0  # seconds a signed webhook's timestamp may be off (settings.webhook_tolerance)
    sse_heartbeat: float = 15.0
    max_streams: int = 100  # live SSE streams open at once (services/gateway/streams.py)
    sse_write_timeout: float = 60.0  # seconds a stream's client may take no data before the stream ends
    open_streams: int = 0
    streams_by_key: dict[str, int] = field(default_factory=dict)
    key_recheck: float = 5.0  # seconds between checks that a live stream's key is still active
    step_modules: Any = None  # the allowlist of a worker in this process (weft up), for publish warnings
    starts: Any = None  # the group commit of starts (routes_starts), made on first use in the serving loop

    def __post_init__(self) -> None:
        self.registry = Registry(self.store)
        self.dead_letters = FreshView(self.store)


def create_app(ctx: Context, *, max_body: int = DEFAULT_MAX_BODY, max_payload_body: int | None = None,
               loopback_hosts_only: bool = False) -> FastAPI:
    """`max_payload_body`: the body limit of requests that carry a payload (errors.carries_payload);
    by default the payload maximum plus room for the request around it and for whitespace
    (the payload itself is measured as compact JSON in the route, and 413 names that limit).
    `loopback_hosts_only`: answer only requests whose Host is a loopback name (auth off: DNS rebinding)."""
    from services.gateway import (
        console, routes_deadletters, routes_executions, routes_replay, routes_starts, routes_triggers, routes_views,
        routes_workflows,
    )

    app = FastAPI(
        dependencies=[Depends(checked_request)],  # one check of every JSON body and query string
        title="Weft", version="1", openapi_url="/v1/openapi.json", docs_url=None, redoc_url=None,
        description=(
            "Event-sourced workflow orchestration. Authenticate with `Authorization: Bearer <key>` "
            "(`weft keys create`). Scopes: `read` (GET), `trigger` (start executions, publish triggers), "
            "`admin` (publish workflows, control executions, reprocess or discard dead letters, keys; "
            "implies the other two)."
        ),
    )
    app.state.ctx = ctx
    errors.install(app)
    if max_payload_body is None:  # (no ctx: an app built only for its OpenAPI document)
        most = ctx.executions.claims.limits.maximum if ctx is not None else PayloadLimits().maximum
        max_payload_body = most + max(1024 * 1024, most // 4)
    from services.gateway.fast_starts import FastStarts

    app.add_middleware(FastStarts)  # added first, so it runs inside BodyLimit: the body is already bounded
    app.add_middleware(errors.BodyLimit, limit=max_body, large=max_payload_body)
    app.include_router(routes_views.router)  # before executions: /v1/executions/{id}/at/{n}
    app.include_router(routes_workflows.router)
    app.include_router(routes_starts.router)  # before /{execution_id}: ":batch" is not an id
    app.include_router(routes_executions.router)
    app.include_router(routes_triggers.router)
    app.include_router(routes_replay.router)
    app.include_router(routes_deadletters.router)
    console.install(app, loopback_hosts_only=loopback_hosts_only)  # /ui, /v1/docs (offline), security headers
    _observe(app)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> dict[str, Any]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, tags=["health"],
             responses={503: {"model": Health, "description": "The store or the broker is unreachable"}})
    async def readyz() -> Any:
        """The store and the broker are reachable."""
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(asyncio.to_thread(ctx.store.head), timeout=2.0)
            checks["store"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks["store"] = f"unreachable: {type(exc).__name__}"
        connected = getattr(ctx.transport, "is_connected", True)
        checks["broker"] = "ok" if connected else "unreachable"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "weft_<prefix>_<secret>"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _observe(app: FastAPI) -> None:
    """Request metrics and /metrics (Prometheus, for every service in this process); server spans."""
    from services.gateway.errors import ApiError
    from services.telemetry import tracing
    from services.telemetry.http import RequestMetrics, metrics_response

    async def metrics(request: Request) -> Response:
        # Workflow names and counts of every workflow: a `read` key bound to none in particular
        # (Prometheus sends it as `authorization: {credentials: ...}`), or no key when auth is off.
        key = await request.app.state.ctx.auth.require(request, "read")
        if key.workflows is not None:
            raise ApiError(403, "/metrics covers every workflow: a key bound to some workflows may not read it")
        return await metrics_response()

    app.add_middleware(RequestMetrics)
    app.add_api_route("/metrics", metrics, methods=["GET"], tags=["health"], include_in_schema=False,
                      response_model=None)
    tracing.instrument_app(app)
