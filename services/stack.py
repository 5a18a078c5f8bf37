"""Wiring: build the services from settings and run them, together or alone.

`weft up` runs all of them in one process beside an embedded NATS server;
`weft orchestrator|relay|worker|projector` run one each, for a deployment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from contextlib import AsyncExitStack
from typing import Any, Awaitable, Callable, Iterable

from services.broker import NatsTransport, Transport
from services.orchestrator.consumer import ResultConsumer
from services.orchestrator.executions import Executions
from services.orchestrator.inbox import prune_inbox
from services.orchestrator.relay import Relay
from services.projections import Projector, default_views
from services.settings import Settings
from services.store import EventStore, open_store
from services.worker.runtime import Worker
from services.worker.steps import HttpPolicy, default_registry

log = logging.getLogger("weft")
ALL = ("orchestrator", "relay", "worker", "projector", "deadletters", "triggers", "scheduler", "gateway")


class Stack:
    """The live parts of one process, for tests and benchmarks to look into."""

    def __init__(self, settings: Settings, store: EventStore, transport: Transport):
        self.settings, self.store, self.transport = settings, store, transport
        self.executions = Executions(store)
        self.relay: Relay | None = None
        self.consumer: ResultConsumer | None = None
        self.worker: Worker | None = None
        self.projector: Projector | None = None
        self.deadletters: Any = None  # services.deadletters.DeadLetterService
        self.triggers: Any = None  # services.triggers.consumer.TriggerConsumer
        self.scheduler: Any = None  # services.triggers.cron.Scheduler
        self.gateway: Any = None  # services.gateway.server.GatewayServer (.url)


async def connect(settings: Settings) -> tuple[EventStore, Transport]:
    if not settings.nats_url:
        raise RuntimeError("no NATS url: run `weft up` (its home folder tells the services where), or set WEFT_NATS_URL")
    assert settings.database_url
    store = await asyncio.to_thread(open_store, settings.database_url, pool_size=12)
    transport = await NatsTransport.connect(settings.nats_url, namespace=settings.namespace)
    await transport.ensure_streams()
    return store, transport


async def run_services(
    settings: Settings, parts: Iterable[str], stop: asyncio.Event,
    on_ready: Callable[[Stack], Awaitable[None] | None] | None = None,
) -> None:
    parts = set(parts)
    async with AsyncExitStack() as exits:
        store, transport = await connect(settings)
        exits.callback(store.close)
        exits.push_async_callback(transport.close)
        stack = Stack(settings, store, transport)
        runs: list[Awaitable[Any]] = []
        if "relay" in parts:
            stack.relay = Relay(store, transport, batch=settings.relay_batch, poll_interval=settings.poll_interval,
                                executions=stack.executions)
            stack.executions.listeners.append(stack.relay.poke)
            runs.append(stack.relay.run(stop))
        if "orchestrator" in parts:
            stack.consumer = ResultConsumer(
                stack.executions, transport, batch=settings.result_batch, ack_wait=settings.ack_wait,
                max_deliver=settings.max_deliver, poison_deliveries=settings.poison_deliveries,
            )
            runs.append(stack.consumer.run(stop))
            runs.append(prune_inbox(store, stop, retention=settings.inbox_retention))
        if "worker" in parts:
            # Like celery and rq: step callables are imported relative to where the worker runs.
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            registry = default_registry(HttpPolicy(allow_private=settings.http_allow_private))
            stack.worker = Worker(
                transport, registry, concurrency=settings.worker_concurrency, worker_id=settings.worker_id,
                ack_wait=settings.ack_wait, max_deliver=settings.max_deliver,
                poison_deliveries=settings.poison_deliveries,
            )
            runs.append(stack.worker.run(stop))
        if "projector" in parts:
            stack.projector = await asyncio.to_thread(
                Projector, store, default_views(), batch=settings.projection_batch, poll_interval=settings.poll_interval
            )
            runs.append(stack.projector.run(stop))
        if "deadletters" in parts:
            from services.deadletters import DeadLetterService

            stack.deadletters = await asyncio.to_thread(
                DeadLetterService, store, transport, ack_wait=settings.ack_wait, projector=stack.projector
            )
            runs.append(stack.deadletters.run(stop))
        if parts & {"triggers", "scheduler", "gateway"}:
            from services.gateway.server import front_door  # trigger consumer, cron scheduler, HTTP gateway

            runs.extend(await front_door(stack, parts, stop))
        if on_ready is not None:
            maybe = on_ready(stack)
            if maybe is not None:
                await maybe
        tasks = [asyncio.ensure_future(r) for r in runs]
        try:
            done, _ = await asyncio.wait(
                [*tasks, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            for t in done:
                if t in tasks and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
