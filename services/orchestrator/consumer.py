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

from contracts.deadletters import message_key
from contracts.messages import MessageError, StepResult, decode_result
from contracts.subjects import RESULTS_STREAM
from services.broker import Consumer, Delivery, Transport
from services.faults import crash_point
from services.orchestrator.executions import Executions
from services.retrying import Backoff

log = logging.getLogger("weft.orchestrator")
DURABLE = "orchestrator"


class ResultConsumer:
    def __init__(
        self, executions: Executions, transport: Transport, *, batch: int = 256, ack_wait: float = 30.0,
        max_deliver: int = 20,
    ):
        self.executions, self.transport = executions, transport
        self.batch, self.ack_wait, self.max_deliver = batch, ack_wait, max_deliver
        self.applied = 0
        self.consumer: Consumer | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self.consumer = await self.transport.consumer(
            RESULTS_STREAM, DURABLE, ack_wait=self.ack_wait, max_deliver=self.max_deliver,
            max_ack_pending=self.batch * 8,
        )
        backoff = Backoff()
        while not stop.is_set():
            try:
                msgs = await self.consumer.fetch(self.batch, timeout=0.5)
                if msgs:
                    await self.handle(msgs)
                backoff.reset()
            except Exception:  # store or broker away: nothing acked, so all is redelivered
                await backoff.failed(stop, log, "orchestrator: a batch")
        await self.consumer.close()

    async def handle(self, msgs: list[Delivery]) -> None:
        good: list[tuple[Delivery, StepResult]] = []
        poison: list[tuple[Delivery, str]] = []
        for msg in msgs:
            try:
                good.append((msg, decode_result(msg.data)))
            except MessageError as exc:
                poison.append((msg, str(exc)))
        if poison:  # concurrently: a flood of garbage must not hold up the good results behind it
            await asyncio.gather(*(self._dead_letter(m, "poison", why) for m, why in poison))
        if not good:
            return
        outcomes = await asyncio.to_thread(self.executions.apply_results, [r for _, r in good])
        crash_point("orchestrator.after_append")
        by_id = {o.message_id: o for o in outcomes}
        for msg, result in good:
            outcome = by_id.get(result.message_id)
            if outcome is not None and outcome.status == "unknown":
                await self._dead_letter(msg, "unknown_task", outcome.reason)
            else:
                await msg.ack()
        self.applied += sum(1 for o in outcomes if o.status == "applied")

    async def _dead_letter(self, msg: Delivery, kind: str, reason: str) -> None:
        await self.transport.dead_letter(
            kind, msg.data, reason=reason, headers=msg.headers, source_subject=msg.subject,
            delivered=msg.delivered, msg_id=message_key(RESULTS_STREAM, msg.stream_seq),
        )
        crash_point("orchestrator.after_dead_letter")  # stored in the DLQ, not yet acked: redelivery dedups
        await msg.ack()
        log.warning("result dead-lettered (%s): %s", kind, reason)
