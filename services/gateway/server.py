"""Serving the gateway inside the stack's event loop, and wiring the front door.

`front_door(stack, parts, stop)` builds what `services.stack.run_services`
runs for the parts "triggers" (the topic consumer), "scheduler" (cron) and
"gateway" (HTTP): one catalog and one ingestor shared by the three.

`GatewayServer` binds its socket up front (port 0 = a free port, known at
once so `weft up` can print it), then runs uvicorn's `Server.serve()` in the
running loop, without uvicorn's signal handling: the stack owns the signals
and tells the server to exit through `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Iterator

import uvicorn
from fastapi import FastAPI

from services.listener import listen
from services.gateway.app import Context, create_app
from services.gateway.auth import Authenticator, is_loopback
from services.gateway.keys import Keys
from services.projections import ExecutionsView, prepare
from services.telemetry.observed import ObservedIngestor
from services.triggers.consumer import TriggerConsumer
from services.triggers.cron import Scheduler
from services.triggers.ingest import Ingestor
from services.triggers.routing import Catalog

log = logging.getLogger("weft.gateway")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the stack handles SIGINT/SIGTERM
        yield


class GatewayServer:
    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host = app, host
        self.sock = listen(host, port, "gateway", backlog=2048)
        self.port: int = self.sock.getsockname()[1]
        self.server: _Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def run(self, stop: asyncio.Event) -> None:
        quiet = logging.getLogger("uvicorn.error")
        if quiet.level == logging.NOTSET:  # "Started server process" etc.: we announce the URL ourselves
            quiet.setLevel(logging.WARNING)
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=3,
            server_header=False,
        )
        self.server = _Server(config)
        serving = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.server.should_exit = True
            stopping.cancel()
            await serving
            self.sock.close()
            await asyncio.to_thread(self.app.state.ctx.dead_letters.close)


def build_gateway(stack: Any, catalog: Catalog, ingestor: Ingestor, stop: asyncio.Event) -> GatewayServer:
    settings = stack.settings
    if not settings.gateway_auth and not is_loopback(settings.gateway_host):
        raise RuntimeError(
            f"refusing to serve the gateway without auth on {settings.gateway_host}: only a loopback address may "
            "run without keys (create one with `weft keys create --scopes ...`)"
        )
    prepare(stack.store, [ExecutionsView()])  # the list reads this view; it may not exist yet in a fresh store
    keys = Keys(stack.store)
    ctx = Context(
        store=stack.store, transport=stack.transport, executions=stack.executions, catalog=catalog,
        ingestor=ingestor, keys=keys, auth=Authenticator(keys, enabled=settings.gateway_auth), stop=stop,
        webhook_tolerance=settings.webhook_tolerance,
    )
    ctx.step_modules = getattr(stack, "step_modules", None)
    ctx.max_streams = settings.gateway_max_streams
    app = create_app(ctx, max_body=settings.gateway_max_body, loopback_hosts_only=not settings.gateway_auth)
    return GatewayServer(app, settings.gateway_host, settings.gateway_port)


async def front_door(stack: Any, parts: set[str], stop: asyncio.Event) -> list[Awaitable[Any]]:
    """The runs of the trigger consumer, the scheduler and the gateway, as `parts` asks."""
    settings = stack.settings
    catalog = Catalog(stack.store)
    await asyncio.to_thread(catalog.refresh, force=True)

    ingestor = ObservedIngestor(stack.executions, catalog)  # its starts wake the relay through executions
    runs: list[Awaitable[Any]] = []
    if "triggers" in parts:
        stack.triggers = TriggerConsumer(ingestor, stack.transport, batch=settings.trigger_batch,
                                         ack_wait=settings.ack_wait, max_deliver=settings.max_deliver,
                                         poison_deliveries=settings.poison_deliveries)
        runs.append(stack.triggers.run(stop))
    if "scheduler" in parts:
        stack.scheduler = Scheduler(stack.store, catalog, ingestor, transport=stack.transport, grace=settings.cron_grace)
        runs.append(stack.scheduler.run(stop))
    if "gateway" in parts:
        stack.gateway = await asyncio.to_thread(build_gateway, stack, catalog, ingestor, stop)
        runs.append(stack.gateway.run(stop))
    return runs
