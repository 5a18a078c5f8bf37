"""The result consumer: StepResults in, decided events out, ack after commit.

Pulls results in batches and applies a batch in one store transaction with its
inbox records (services.orchestrator.executions). Only after that commit are the
messages acked; a crash before the ack means redelivery, which the inbox and the
state turn into no-ops. A message that cannot be decoded, or that names an
execution or step that does not exist, goes to the dead-letter stream with the
reason before it is acked: never dropped, never a crashed loop.

A result whose handling kills the process (services.broker.redelivery) comes
back after every restart. Redelivered results are handled one at a time, and
past `poison_deliveries` unexplained deliveries one is not handled again: it is
dead-lettered as poison and its step failed (decide: Undeliverable, error
PoisonMessage), so the execution ends instead of staying `running`.
"""

from __future__ import annotations

import asyncio
import logging

from contracts.deadletters import message_key
from contracts.messages import MessageError, StepResult, decode_result, task_of
from contracts.subjects import RESULTS_STREAM
from services.broker import Consumer, DeadLetter, Delivery, MessageRejected, Transport
from services.broker.redelivery import CrashGuard, poison_reason
from services.broker.shelving import Shelf, shelve
from services.faults import crash_point
from services.orchestrator.decide import DecisionError, Undeliverable
from services.orchestrator.executions import Executions, NotFound
from services.retrying import Backoff, Throttled

log = logging.getLogger("weft.orchestrator")
DURABLE = "orchestrator"


class ResultConsumer:
    def __init__(
        self, executions: Executions, transport: Transport, *, batch: int = 256, ack_wait: float = 4.0,
        max_deliver: int = 20, poison_deliveries: int = 5,
    ):
        self.executions, self.transport = executions, transport
        self.batch, self.ack_wait, self.max_deliver = batch, ack_wait, max_deliver
        self.poison_deliveries = poison_deliveries
        self.guard = CrashGuard(poison_deliveries, careful_for=2 * ack_wait)
        self.applied = self.poisoned = 0
        self._throttled = Throttled(log)
        self.consumer: Consumer | None = None
        self._shelf = Shelf(transport, "poison", RESULTS_STREAM, crash="orchestrator.after_dead_letter",
                            what="result(s)", log=log, most=batch)

    async def run(self, stop: asyncio.Event) -> None:
        self.consumer = await self.transport.consumer(
            RESULTS_STREAM, DURABLE, ack_wait=self.ack_wait, max_deliver=self.max_deliver,
            max_ack_pending=self.batch * 8,
        )
        guard = self.guard = CrashGuard(self.poison_deliveries, careful_for=2 * self.ack_wait,
                                        unacked_at_start=getattr(self.consumer, "unacked_at_start", 1))
        backoff = Backoff()
        while not stop.is_set():
            try:
                msgs = await self.consumer.fetch(1 if guard.careful else self.batch, timeout=0.5)
                backoff.reset()
            except Exception:  # the broker is away
                await backoff.failed(stop, log, "orchestrator: a fetch")
                continue
            if msgs:
                await self.handle(msgs, stop)
        await self._shelf.close()
        await self.consumer.close()

    async def handle(self, msgs: list[Delivery], stop: asyncio.Event | None = None) -> None:
        """First deliveries in one batch; redelivered ones each alone, after them; poison not at all."""
        fresh: list[Delivery] = []
        suspects: list[Delivery] = []
        for msg in msgs:
            if self.guard.poisoned(msg):
                await self._poisoned(msg)
            elif self.guard.suspect(msg):
                suspects.append(msg)
            else:
                fresh.append(msg)
        if fresh:
            await self._handle(fresh, stop)
        for msg in suspects:
            await self._handle([msg], stop)

    async def _handle(self, msgs: list[Delivery], stop: asyncio.Event | None = None) -> None:
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
        for _, result in good:
            crash_point("orchestrator.handle", result.execution_id)
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
                self.guard.done(msg)
        self.applied += sum(1 for o in outcomes if o.status == "applied")
        if unknown:  # rare, and after the batch's commit: no reason to wait on the shelf
            await shelve(self.transport, "unknown_task", RESULTS_STREAM, unknown,
                         crash="orchestrator.after_dead_letter", what="result(s)", log=log)

    async def _poisoned(self, msg: Delivery) -> None:
        """A result delivered too often without an ack (handling it killed or stalled the orchestrator):
        not handled again. Dead-lettered as it is, and its step failed through an event, so the
        execution ends. Neither is done twice: the dead letter's id is the message's, and decide
        ignores an Undeliverable for an attempt already over."""
        reason = poison_reason(msg.delivered, "orchestrator")
        try:
            await self._dead_letter_poison(msg, reason)
        except Exception as exc:  # the broker or the store is away: left unacked, it comes back
            self.guard.survived(msg)
            self._throttled.failure(f"poison-report:{type(exc).__name__}",
                                    "orchestrator: could not dead-letter a poison result; it will be redelivered",
                                    exc=exc)

    async def _dead_letter_poison(self, msg: Delivery, reason: str) -> None:
        try:
            await self.transport.dead_letter_many(
                [DeadLetter.of(msg, "poison", reason, message_key(RESULTS_STREAM, msg.stream_seq))])
        except MessageRejected as exc:  # too large even for the DLQ: the step's dead letter keeps the reason
            self._throttled.failure("poison-dlq", "orchestrator: a poison result cannot be dead-lettered: %s", exc)
        crash_point("orchestrator.after_dead_letter")
        task = task_of(msg.msg_id)
        if task is not None:
            eid, step_id, item, attempt = task
            try:
                await asyncio.to_thread(self.executions.command, eid,
                                        Undeliverable(step_id, item, attempt, "PoisonMessage", reason))
            except (NotFound, DecisionError, ValueError):
                pass  # no such execution (or not an id): the dead letter is all there is to do
        await msg.ack()
        self.guard.done(msg)
        self.poisoned += 1
        self._throttled.failure("poison", "orchestrator: result %s was %s; dead-lettered, its step failed",
                                msg.msg_id, reason)


async def _each(batch: list[tuple[Delivery, StepResult]], what: str) -> None:
    for msg, _ in batch:
        try:
            await getattr(msg, what)()
        except Exception:  # noqa: BLE001 - the broker may be away too: it redelivers after ack_wait
            log.debug("%s of a held result failed", what, exc_info=True)
            return
