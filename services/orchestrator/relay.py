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
from collections import deque

import orjson

from contracts.subjects import step_subject
from services.broker import OutMessage, Transport
from services.faults import crash_point
from services.retrying import Backoff, sleep_or_stop
from services.store import EventStore, StoredRecord
from services.telemetry.hops import step_headers, traced_publish

log = logging.getLogger("weft.relay")


def to_message(rec: StoredRecord) -> OutMessage:
    """StoredRecord of a StepScheduled -> the StepReady command for it.

    Built straight from the stored JSON: this runs for every step, and the
    event was validated when it was decided. tests/unit/test_relay.py checks the
    result against the StepReady model.
    """
    e = orjson.loads(rec.data)
    execution_id = str(rec.stream_id)
    item = e.get("item")
    key = f"{execution_id}:{e['step_id']}" if item is None else f"{execution_id}:{e['step_id']}#{item}"
    ready = {
        "schema_version": 1,
        "execution_id": execution_id,
        "workflow": e.get("workflow") or "",
        "step_id": e["step_id"],
        "item": item,
        "attempt": e["attempt"],
        "step_type": e["step_type"],
        "config": e.get("config") or {},
        "input": e.get("input"),
        "idempotency_key": e["idempotency_key"],
        "timeout": e.get("timeout"),
        "not_before": e.get("not_before"),
        "scheduled_at": e["at"],
        "trace_id": e.get("trace_id"),
        "secrets": e.get("secrets") or {},
    }
    return OutMessage(subject=step_subject(e["step_type"]), data=orjson.dumps(ready), msg_id=f"{key}:{e['attempt']}",
                      headers=step_headers(e))


class Relay:
    def __init__(
        self, store: EventStore, transport: Transport, *, name: str = "relay", batch: int = 512,
        poll_interval: float = 0.05, in_flight: int = 4,
    ):
        self.store, self.transport, self.name = store, transport, name
        self.batch, self.poll_interval, self.in_flight = batch, poll_interval, in_flight
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
        tracked = await asyncio.to_thread(self.store.position, self.name)
        log.info("relay following the log from position %d", tracked)
        position = tracked
        # Up to `in_flight` batches are being published at once; positions are
        # saved strictly in order, only for batches whose publishes were all acked.
        pending: deque[tuple[int, int, asyncio.Task[None]]] = deque()
        backoff = Backoff(first=self.poll_interval)
        while not stop.is_set():
            try:
                done_to = tracked
                while pending and pending[0][2].done():
                    pos, count, task = pending.popleft()
                    task.result()  # a failed publish raises here: start again from `tracked`
                    done_to = pos
                    self.published += count
                if done_to != tracked:
                    crash_point("relay.after_publish")
                    await asyncio.to_thread(self.store.track, self.name, done_to)
                    tracked = done_to
                if len(pending) >= self.in_flight:
                    await asyncio.wait({pending[0][2]})
                    continue
                records, scanned = await asyncio.to_thread(self.store.follow, position, self.batch, ["StepScheduled"])
                if records:
                    messages = [to_message(r) for r in records]
                    task = asyncio.ensure_future(traced_publish(self.transport.publish_many, messages))
                    pending.append((scanned, len(records), task))
                    position = scanned
                    backoff.reset()
                    continue
                position = scanned  # past the other events: the next poll does not walk them again
                if pending:
                    await asyncio.wait({pending[0][2]}, timeout=self.poll_interval)
                    continue
            except Exception:  # the broker or the database is away: wait, then go on
                for _, _, task in pending:
                    task.cancel()
                pending.clear()
                await backoff.failed(stop, log, "relay: a publish")
                tracked = await _position_or(self.store, self.name, tracked)
                position = tracked  # republish what was not confirmed: the broker drops duplicates
                continue
            self._wake.clear()
            await sleep_or_stop(stop, self.poll_interval, wake=self._wake)
        for _, _, task in pending:
            task.cancel()


async def _position_or(store: EventStore, name: str, fallback: int) -> int:
    try:
        return await asyncio.to_thread(store.position, name)
    except Exception:
        return fallback
