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
import threading
from contextlib import AsyncExitStack
from typing import Any, Awaitable, Callable, Iterable

from services.broker import Transport
from services.broker.connect import NO_BROKER, connect_transport
from services.broker.nats_auth import ADMIN
from services.orchestrator.consumer import ResultConsumer
from services.orchestrator.executions import Executions
from services.orchestrator.inbox import prune_inbox
from services.orchestrator.relay import Relay
from services.projections import Projector, default_views
from services.retrying import Backoff, away
from services.settings import Settings
from services.store import EventStore, open_store
from services.store.blobs import SqlBlobStore
from services.telemetry import observe
from services.telemetry.observed import ObservedExecutions, ObservedResultConsumer, ObservedWorker
from services.worker.runtime import Worker
from services.worker.steps import HttpPolicy, StepModules, default_registry
from services.worker.steps.allowlist import SETTING as STEP_MODULES_SETTING

log = logging.getLogger("weft")
ALL = ("orchestrator", "relay", "worker", "projector", "deadletters", "triggers", "scheduler", "gateway")


class Stack:
    """The live parts of one process, for tests and benchmarks to look into."""

    def __init__(self, settings: Settings, store: EventStore, transport: Transport):
        self.settings, self.store, self.transport = settings, store, transport
        self.executions: Executions = ObservedExecutions(store, limits=settings.payload_limits())
        self.relay: Relay | None = None
        self.consumer: ResultConsumer | None = None
        self.worker: Worker | None = None
        self.projector: Projector | None = None
        self.deadletters: Any = None  # services.deadletters.DeadLetterService
        self.triggers: Any = None  # services.triggers.consumer.TriggerConsumer
        self.scheduler: Any = None  # services.triggers.cron.Scheduler
        self.gateway: Any = None  # services.gateway.server.GatewayServer (.url)
        self.step_modules: StepModules | None = None  # what this process's worker may call, if it runs one
        self.metrics_server: Any = None  # services.telemetry.http.MetricsServer (WEFT_METRICS_PORT), if any


async def run_services(
    settings: Settings, parts: Iterable[str], stop: asyncio.Event,
    on_ready: Callable[[Stack], Awaitable[None] | None] | None = None,
) -> None:
    parts = set(parts)
    async with AsyncExitStack() as exits:
        # Traces, metrics and /healthz come first: a supervisor sees the process alive (not ready)
        # while it waits for its store or broker.
        seen = await observe.begin(settings, parts, stop, exits)
        built = await _build_when_up(settings, parts, stop, exits)
        if built is None:
            return  # asked to stop before the store and the broker could be reached
        stack, runs = built
        runs.extend(observe.watch(stack, parts, stop, exits, seen))
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
            await _drain(tasks, settings.drain_grace)


async def _build_when_up(
    settings: Settings, parts: set[str], stop: asyncio.Event, exits: AsyncExitStack,
) -> tuple[Stack, list[Awaitable[Any]]] | None:
    """Build the services, waiting for the store and the broker for as long as they are away.

    A service started (or restarted by its supervisor) during a database or broker outage
    waits for them, as a running one does, instead of exiting.
    """
    backoff = Backoff(first=0.2)
    while not stop.is_set():
        attempt = AsyncExitStack()
        runs: list[Awaitable[Any]] = []
        try:
            stack = await _build(settings, parts, stop, attempt, runs)
        except Exception as exc:
            for run in runs:  # built but never started
                close = getattr(run, "close", None)
                if close is not None:
                    close()
            await attempt.aclose()
            if not away(exc):
                raise
            await backoff.failed(stop, log, "starting (the store or the broker is away)")
            continue
        if backoff.failures:
            backoff.reset()
        exits.push_async_callback(attempt.aclose)
        return stack, runs
    return None


async def _build(
    settings: Settings, parts: set[str], stop: asyncio.Event, exits: AsyncExitStack, runs: list[Awaitable[Any]],
) -> Stack:
    if not settings.broker():
        raise RuntimeError(NO_BROKER)
    assert settings.database_url
    store = await asyncio.to_thread(open_store, settings.database_url, pool_size=12)
    exits.callback(store.close)
    credentials = settings.nats_credentials()
    transport = await connect_transport(settings)
    exits.push_async_callback(_bounded, transport.close(), "closing the broker connection")
    # Only the admin role may create streams (a worker that could would be one more way in):
    # a service with a narrower role finds them made by `weft up` or `weft broker init`.
    if credentials.get("user") in (None, ADMIN):
        await transport.ensure_streams()
    # An oversized dead letter keeps its full bytes in the blob store, beside the events.
    transport.blob_sink = SqlBlobStore(store).put
    stack = Stack(settings, store, transport)
    if "relay" in parts:
        stack.relay = Relay(store, transport, batch=settings.relay_batch, poll_interval=settings.poll_interval,
                            executions=stack.executions)
        stack.executions.listeners.append(stack.relay.poke)
        runs.append(stack.relay.run(stop))
    if "orchestrator" in parts:
        stack.consumer = ObservedResultConsumer(
            stack.executions, transport, batch=settings.result_batch, ack_wait=settings.ack_wait,
            max_deliver=settings.max_deliver, poison_deliveries=settings.poison_deliveries,
        )
        runs.append(stack.consumer.run(stop))
        runs.append(prune_inbox(store, stop, retention=settings.inbox_retention))
    if "worker" in parts:
        # Like celery and rq: step callables are imported relative to where the worker runs.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        stack.step_modules = step_modules(settings)
        policy = HttpPolicy(allow_private=settings.http_allow_private,
                            allowed_hosts=frozenset(filter(None, settings.http_allowed_hosts.split(","))))
        registry = default_registry(policy, stack.step_modules)
        stack.worker = ObservedWorker(
            transport, registry, concurrency=settings.worker_concurrency, worker_id=settings.worker_id,
            ack_wait=settings.ack_wait, max_deliver=settings.max_deliver, drain_grace=settings.drain_grace,
            secrets=worker_secrets(settings), claims=stack.executions.claims,
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
    return stack


async def _drain(tasks: list[asyncio.Future[Any]], grace: float) -> None:
    """Give the services `grace` seconds to finish what they hold, then cancel what is left.

    A loop that waits on a store or broker that does not answer must not hold the
    process: shutdown never waits on them past the grace period.
    """
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace + 1.0)  # the worker hands back at `grace`
    if pending:
        log.warning("%d service loop(s) still busy %.0fs after the stop: cancelling them", len(pending), grace)
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=2.0)


def step_modules(settings: Settings) -> StepModules:
    """The worker's allowlist: the setting (or flag) plus installed `weft.steps` entry points."""
    listed = settings.step_modules.split(",") if settings.step_modules else []
    modules = StepModules.build(listed, origin="setting" if listed else "entry points only")
    if modules.names:
        log.info("worker: python steps may call modules %s", modules.describe())
    else:
        log.warning("worker: no step modules are allowed, so every python step will be refused: "
                    "set %s (or --steps) to the modules of your step code", STEP_MODULES_SETTING)
    return modules


def worker_secrets(settings: Settings) -> Any:
    from services.worker.secrets import SecretSource

    return SecretSource(directory=settings.secrets_dir)


async def _bounded(closing: Awaitable[Any], what: str, timeout: float = 3.0) -> None:
    try:
        await asyncio.wait_for(closing, timeout)
    except Exception as exc:  # noqa: BLE001 - stopping goes on: a dead broker cannot be closed politely
        log.warning("%s: %s", what, type(exc).__name__)


def install_signal_handlers(stop: asyncio.Event, grace: float | None = None) -> None:
    """SIGINT/SIGTERM set `stop`. With `grace`, a watchdog ends the process if it is still
    running `grace` + 5 seconds later (a thread blocked on a dead connection cannot be
    cancelled, and asyncio.run waits for its executor's threads)."""
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        if stop.is_set():
            return
        stop.set()
        if grace is not None:
            timer = threading.Timer(grace + 5.0, _overdue, args=(grace + 5.0,))
            timer.daemon = True
            timer.start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping)


def _overdue(after: float) -> None:
    log.error("still running %.0fs after SIGTERM: exiting now", after)
    logging.shutdown()
    os._exit(1)
