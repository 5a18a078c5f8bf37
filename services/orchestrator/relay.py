"""The relay: the transactional outbox's publisher.

Follows the store's notification log from its tracked position and publishes
a StepReady for each StepScheduled, with the deterministic message id
`<execution>:<step>[#item]:<attempt>`. The position is saved only after the
broker acked the publishes; a crash in between republishes, and the broker's
dedup (or the orchestrator's, beyond the broker's window) drops the copies.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from contracts import events as ev
from contracts.messages import StepReady
from contracts.subjects import step_subject
from services.broker import OutMessage, Transport
from services.faults import crash_point
from services.store import EventStore, StoredRecord

log = logging.getLogger("weft.relay")


def to_message(rec: StoredRecord) -> OutMessage:
    e = ev.decode(rec.type, rec.data)
    ready = StepReady(
        execution_id=str(rec.stream_id), workflow="", step_id=e.step_id, item=e.item, attempt=e.attempt,
        step_type=e.step_type, config=e.config, input=e.input, idempotency_key=e.idempotency_key,
        timeout=e.timeout, not_before=e.not_before, scheduled_at=e.at,
    )
    return OutMessage(subject=step_subject(e.step_type), data=ready.encode(), msg_id=ready.message_id)


class Relay:
    def __init__(
        self, store: EventStore, transport: Transport, *, name: str = "relay", batch: int = 512,
        poll_interval: float = 0.05,
    ):
        self.store, self.transport, self.name = store, transport, name
        self.batch, self.poll_interval = batch, poll_interval
        self.published = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def poke(self) -> None:
        """Something was appended: look now rather than at the next poll. Thread-safe."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        position = await asyncio.to_thread(self.store.position, self.name)
        log.info("relay following the log from position %d", position)
        delay = self.poll_interval
        while not stop.is_set():
            try:
                position, count = await self.step(position)
                delay = self.poll_interval
            except Exception:  # the broker or the database is away: wait, then go on
                log.exception("relay: publish failed, retrying in %.1fs", delay)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, 5.0)
                position = await _position_or(self.store, self.name, position)
                continue
            if count == 0:
                self._wake.clear()
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                _, pending = await asyncio.wait(waiters, timeout=self.poll_interval, return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()

    async def step(self, position: int) -> tuple[int, int]:
        records: Sequence[StoredRecord] = await asyncio.to_thread(
            self.store.read, position, self.batch, ["StepScheduled"]
        )
        if not records:
            return position, 0
        await self.transport.publish_many([to_message(r) for r in records])
        crash_point("relay.after_publish")
        position = records[-1].position
        await asyncio.to_thread(self.store.track, self.name, position)
        self.published += len(records)
        return position, len(records)


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except asyncio.TimeoutError:
        pass


async def _position_or(store: EventStore, name: str, fallback: int) -> int:
    try:
        return await asyncio.to_thread(store.position, name)
    except Exception:
        return fallback
