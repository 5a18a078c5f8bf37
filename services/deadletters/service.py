"""The `deadletters` service: ingester, MaxDeliver capture and the dead-letter view, together.

`weft up` runs it as the "deadletters" part; `weft deadletters` runs it alone.
Several replicas may run: they share the durable consumers. The view is a
projection like the others (the projector follows it too). The moment the
ingester stores a dead letter the view is brought up to date, so `weft dlq
list` shows it at once: by waking the projector when it runs in this process
(`weft up`), else by this service's own projector of the one view (whoever
applies a batch first wins; the other moves on). In one process, a second
projector would read the whole log a second time for nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from opentelemetry.metrics import Meter

from services.broker import Transport
from services.deadletters.ingest import Ingester, MaxDeliverCapture
from services.deadletters.metrics import OpenDeadLettersGauge
from services.projections.deadletters import DeadLettersView
from services.projections.runner import Projector
from services.store import EventStore

log = logging.getLogger("weft.deadletters")


class DeadLetterService:
    def __init__(
        self, store: EventStore, transport: Transport, *, batch: int = 256, ack_wait: float = 30.0,
        poll_interval: float = 0.25, meter: Meter | None = None, projector: Projector | None = None,
    ):
        from services.deadletters.nats_archive import NatsArchive

        self.store, self.transport = store, transport
        self.ingester = Ingester(store, transport, batch=batch, ack_wait=ack_wait)
        # Step dead letters are rare and come from other processes: a relaxed poll finds them.
        # Message dead letters are stored here, and the ingester wakes the projector at once.
        self.shared = projector is not None and any(isinstance(v, DeadLettersView) for v in projector.views)
        if projector is None or not self.shared:
            projector = Projector(store, [DeadLettersView()], batch=2000, lanes=1, poll_interval=poll_interval)
        self.projector = projector
        self.ingester.stored = projector.wake
        self.capture: MaxDeliverCapture | None = None
        if NatsArchive.supports(transport):
            self.capture = MaxDeliverCapture(transport, NatsArchive(transport), ack_wait=ack_wait)  # type: ignore[arg-type]
        elif not getattr(transport, "captures_max_deliver", False):
            log.warning("deadletters: this broker has no MaxDeliver advisories; not capturing them")
        self.gauge = OpenDeadLettersGauge(store, meter)

    async def run(self, stop: asyncio.Event) -> None:
        runs: list[Any] = [self.ingester.run(stop)]
        if not self.shared:  # the shared one is its owner's to run (and close)
            runs.append(self.projector.run(stop))
        if self.capture is not None:
            runs.append(self.capture.run(stop))
        tasks = [asyncio.ensure_future(r) for r in runs]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
