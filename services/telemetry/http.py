"""HTTP for telemetry: the gateway's request metrics and /metrics route, and the small
server every standalone service runs on WEFT_METRICS_PORT (/metrics, /healthz, /readyz).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.listener import listen
from services.telemetry import metrics, tracing

log = logging.getLogger("weft.telemetry")


class RequestMetrics:
    """ASGI middleware: request latency by method, route template and status.

    The route is the matched path template (`/v1/executions/{execution_id}`), never the
    raw path: ids in paths would make a new time series per request.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500
        if not tracing.enabled():
            for name, value in scope.get("headers") or ():
                if name == b"traceparent":
                    tracing.incoming.set(tracing.valid(value.decode("latin-1")))
                    break

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics.HTTP_DURATION.labels(scope.get("method", ""), template, str(status)).observe(
                time.perf_counter() - began)


async def metrics_response() -> Response:
    # Collectors read the store: off the event loop.
    body, content_type = await asyncio.to_thread(metrics.exposition)
    return Response(body, media_type=content_type)


async def readiness(store: Any, transport: Any) -> tuple[bool, dict[str, str]]:
    """The store answers and the broker is connected (as the gateway's /readyz checks)."""
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(asyncio.to_thread(store.head), timeout=2.0)
        checks["store"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["store"] = f"unreachable: {type(exc).__name__}"
    checks["broker"] = "ok" if getattr(transport, "is_connected", True) else "unreachable"
    return all(v == "ok" for v in checks.values()), checks


def service_app(state: dict[str, Any]) -> Starlette:
    """/metrics, /healthz (the process answers), /readyz (it has started, and its store and broker answer).

    `state` is filled in by the stack once it is built ("store", "transport"); until then
    /readyz says not ready (the service is still waiting for its store or broker).
    """

    async def metrics_(_: Request) -> Response:
        return await metrics_response()

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        if "store" not in state:
            return JSONResponse({"status": "not ready", "service": "starting"}, status_code=503)
        ready, checks = await readiness(state["store"], state["transport"])
        return JSONResponse({"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503)

    return Starlette(routes=[Route("/metrics", metrics_), Route("/healthz", healthz),
                             Route("/readyz", readyz)])


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the stack owns SIGINT/SIGTERM
        yield


class MetricsServer:
    """Binds at once (port 0 = a free one, known at `.port`), serves until `stop`."""

    def __init__(self, app: ASGIApp, host: str, port: int):
        self.sock = listen(host, port, "metrics (WEFT_METRICS_PORT)")
        self.app, self.host, self.port = app, host, self.sock.getsockname()[1]

    async def run(self, stop: asyncio.Event) -> None:
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, server_header=False)
        server = _Server(config)
        serving = asyncio.ensure_future(server.serve(sockets=[self.sock]))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.should_exit = True
            stopping.cancel()
            await serving
            self.sock.close()
