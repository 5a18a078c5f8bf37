"""Wiring telemetry into a running stack (called by services/stack.py's run_services).

`begin` runs before the services are built: tracing from the OTEL_* variables,
and, with WEFT_METRICS_PORT, the /metrics /healthz /readyz server. `watch`
runs once they are built: the store collector for the parts this process runs
(the relay's and the projections' lag, open dead letters) and the broker
sampler (commands waiting for workers, results for orchestrators).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Any, Awaitable

from prometheus_client import REGISTRY

from services.telemetry import metrics, tracing
from services.telemetry.http import MetricsServer, service_app

log = logging.getLogger("weft.telemetry")


class Seen:
    """What `begin` started, for `watch` to finish."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.server: MetricsServer | None = None


async def begin(settings: Any, parts: set[str], stop: asyncio.Event, exits: AsyncExitStack) -> Seen:
    name = "weft" if len(parts) > 1 else f"weft-{next(iter(parts), 'service')}"
    if tracing.setup(service_name=name):
        exits.callback(tracing.shutdown)
    seen = Seen()
    if settings.metrics_port is not None:
        seen.server = MetricsServer(service_app(seen.state), settings.metrics_host, settings.metrics_port)
        log.info("metrics, /healthz and /readyz on http://%s:%d", settings.metrics_host, seen.server.port)
        task = asyncio.ensure_future(seen.server.run(stop))

        async def finish() -> None:
            stop.set()
            await asyncio.wait({task}, timeout=3.0)

        exits.push_async_callback(finish)
    return seen


def watch(stack: Any, parts: set[str], stop: asyncio.Event, exits: AsyncExitStack, seen: Seen) -> list[Awaitable[Any]]:
    stack.metrics_server = seen.server
    seen.state.update(store=stack.store, transport=stack.transport)
    followers: list[tuple[str, list[str] | None]] = []
    if stack.relay is not None:
        followers.append((stack.relay.name, ["StepScheduled"]))
    if stack.projector is not None:
        followers.extend((v.name, None) for v in stack.projector.views)
    collector = metrics.StoreCollector(stack.store, followers, dead_letters="deadletters" in parts)
    if followers or collector.dead_letters:
        REGISTRY.register(collector)
        exits.callback(_unregister, collector)
    durables = []
    if "worker" in parts:
        durables.append(metrics.COMMANDS)
    if "orchestrator" in parts:
        durables.append(metrics.RESULTS)
    sampler = metrics.BrokerSampler(stack.transport, durables)
    return [sampler.run(stop)] if durables else []


def _unregister(collector: Any) -> None:
    try:
        REGISTRY.unregister(collector)
    except KeyError:
        pass
