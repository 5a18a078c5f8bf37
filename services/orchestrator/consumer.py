"""The result consumer: StepResults in, decided events out, ack after commit.

Pulls results in batches and applies a batch in one store transaction with its
inbox records (services.orchestrator.executions). Only after that commit are the
messages acked; a crash before the ack means redelivery, which the inbox and the
state turn into no-ops. A message that cannot be decoded, or that names an
execution or step that does not exist, goes to the dead-letter stream with the
reason before it is acked: never dropped, never a crashed loop.
"""

from __future__ import annotations

import asyncio
import logging

from contracts.messages import MessageError, StepResult, decode_result
from contracts.subjects import RESULTS_STREAM
from services.broker import Consumer, Delivery, Transport
from services.broker.shelving import Shelf, shelve
from services.faults import crash_point
from services.orchestrator.executions import Executions
from services.retrying import Backoff

log = logging.getLogger("weft.orchestrator")
DURABLE = "orchestrator"


class ResultConsumer:
    def __init__(
        self, executions: Executions, transport: Transport, *, batch: int = 256, ack_wait: float = 4.0,
        max_deliver: int = 20,
    ):
        self.executions, self.transport = executions, transport
        self.batch, self.ack_wait, self.max_deliver = batch, ack_wait, max_deliver
        self.applied = 0
        self.consumer: Consumer | None = None
        self._shelf = Shelf(transport, "poison", RESULTS_STREAM, crash="orchestrator.after_dead_letter",
                            what="result(s)", log=log, most=batch)

    async def run(self, stop: asyncio.Event) -> None:
        self.consumer = await self.transport.consumer(
            RESULTS_STREAM, DURABLE, ack_wait=self.ack_wait, max_deliver=self.max_deliver,
            max_ack_pending=self.batch * 8,
        )
        backoff = Backoff()
        while not stop.is_set():
            try:
                msgs = await self.consumer.fetch(self.batch, timeout=0.5)
                backoff.reset()
            except Exception:  # the broker is away
                await backoff.failed(stop, log, "orchestrator: a fetch")
                continue
            if msgs:
                await self.handle(msgs, stop)
        await self._shelf.close()
        await self.consumer.close()

    async def handle(self, msgs: list[Delivery], stop: asyncio.Event | None = None) -> None:
        good: list[tuple[Delivery, StepResult]] = []
        poison: list[tuple[Delivery, str]] = []
        for msg in msgs:
            try:
                good.append((msg, decode_result(msg.data)))
            except MessageError as exc:
                poison.append((msg, str(exc)))
        # Garbage goes on the shelf (to the DLQ with the next batches' garbage, in one write),
        # not before the good results: a flood of it must not hold them up.
        if poison:
            self._shelf.put(poison)
        if good:
            await self._apply_until_done(good, stop or asyncio.Event())

    async def _apply_until_done(self, good: list[tuple[Delivery, StepResult]], stop: asyncio.Event) -> None:
        """Apply a batch, holding on to it while the store is away.

        Left unacked, a batch would come back only after ack_wait (30 s by default): that
        was most of the stall after a database restart. So the batch is kept, its leases
        renewed (in-progress acks do not count as deliveries), and applied again as soon
        as the store answers. Asked to stop meanwhile, it is handed back (nak) for
        another orchestrator to take at once.
        """
        backoff = Backoff()
        keeper = asyncio.ensure_future(self._keep_leases(good))
        try:
            while True:
                try:
                    await self._apply(good)
                    backoff.reset()
                    return
                except Exception:  # the store (or the broker, for the acks) is away
                    await backoff.failed(stop, log, "orchestrator: a batch")
                if stop.is_set():
                    await _each(good, "nak")
                    return
        finally:
            keeper.cancel()

    async def _keep_leases(self, batch: list[tuple[Delivery, StepResult]]) -> None:
        # ack_wait is short (seconds) so that a dead orchestrator's batch moves on quickly;
        # a live one renews its leases for as long as a slow commit or an outage lasts.
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            await _each(batch, "in_progress")

    async def _apply(self, good: list[tuple[Delivery, StepResult]]) -> None:
        outcomes = await asyncio.to_thread(self.executions.apply_results, [r for _, r in good])
        crash_point("orchestrator.after_append")
        by_id = {o.message_id: o for o in outcomes}
        unknown: list[tuple[Delivery, str]] = []
        for msg, result in good:
            outcome = by_id.get(result.message_id)
            if outcome is not None and outcome.status == "unknown":
                unknown.append((msg, outcome.reason))
            else:
                await msg.ack()
        self.applied += sum(1 for o in outcomes if o.status == "applied")
        if unknown:  # rare, and after the batch's commit: no reason to wait on the shelf
            await shelve(self.transport, "unknown_task", RESULTS_STREAM, unknown,
                         crash="orchestrator.after_dead_letter", what="result(s)", log=log)


async def _each(batch: list[tuple[Delivery, StepResult]], what: str) -> None:
    for msg, _ in batch:
        try:
            await getattr(msg, what)()
        except Exception:  # noqa: BLE001 - the broker may be away too: it redelivers after ack_wait
            log.debug("%s of a held result failed", what, exc_info=True)
            return
