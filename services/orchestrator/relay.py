"""The relay: the transactional outbox's publisher.

Follows the store's notification log from its tracked position and publishes
a StepReady for each StepScheduled, with the deterministic message id
`<execution>:<step>[#item]:<attempt>`. The position is saved only after the
broker acked the publishes; a crash in between republishes, and the broker's
dedup (or the orchestrator's, beyond the broker's window) drops the copies.

A record that can never be published (its command is over the broker's size
limit, or cannot be built from the record) must not hold up every record behind
it: its step is failed through the execution service (`Undeliverable`, which
dead-letters the step and fails the execution) and the relay goes on past it.
Any other failure (the broker or the database away) is waited out, with
backoff, from the last saved position.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from contracts import events as ev
from contracts.messages import ready_from_scheduled
from contracts.subjects import step_subject
from services.broker import MessageRejected, OutMessage, Transport
from services.faults import crash_point
from services.orchestrator.decide import Undeliverable
from services.orchestrator.executions import Executions, NotFound
from services.retrying import Backoff, Throttled, sleep_or_stop
from services.store import EventStore, StoredRecord
from services.telemetry.hops import step_headers, traced_publish

log = logging.getLogger("weft.relay")


def to_message(rec: StoredRecord) -> OutMessage:
    """StoredRecord of a StepScheduled -> the StepReady command for it, made by the contract
    (`contracts.messages.ready_from_scheduled`), so no field is dropped on the way."""
    scheduled = ev.decode(rec.type, rec.data)
    ready = ready_from_scheduled(str(rec.stream_id), scheduled)
    return OutMessage(subject=step_subject(ready.step_type), data=ready.encode(), msg_id=ready.message_id,
                      headers=step_headers(scheduled), key=str(rec.stream_id))


@dataclass(slots=True)
class _Batch:
    """Records being published together; `scanned` is the log position to save once they are."""

    scanned: int
    records: list[StoredRecord]
    messages: list[OutMessage]
    task: asyncio.Task[None]


class Relay:
    def __init__(
        self, store: EventStore, transport: Transport, *, name: str = "relay", batch: int = 512,
        poll_interval: float = 0.05, in_flight: int = 4, executions: Executions | None = None,
        track_every: float = 0.2,
    ):
        self.store, self.transport, self.name = store, transport, name
        self.batch, self.poll_interval, self.in_flight = batch, poll_interval, in_flight
        self.track_every = track_every
        self.executions = executions if executions is not None else Executions(store)
        self.published = 0
        self.undeliverable = 0
        self._throttled = Throttled(log)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def poke(self) -> None:
        """Something was appended: look now rather than at the next poll. Thread-safe."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = loop = asyncio.get_running_loop()
        tracked = await asyncio.to_thread(self.store.position, self.name)
        log.info("relay following the log from position %d", tracked)
        position = tracked
        confirmed = tracked  # published and acked up to here; saved at most every `track_every`
        saved_at = loop.time()
        # Up to `in_flight` batches are being published at once; positions are
        # saved strictly in order, only for batches whose publishes were all acked.
        pending: deque[_Batch] = deque()
        backoff = Backoff(first=self.poll_interval)
        while not stop.is_set():
            try:
                while pending and pending[0].task.done():
                    head = pending.popleft()
                    try:
                        head.task.result()
                    except MessageRejected:
                        # Some record of this batch can never be published. The batches after it
                        # wait: positions are saved in order. Publish this one bit by bit.
                        for later in pending:
                            later.task.cancel()
                        pending.clear()
                        await self._publish_apart(head.records, head.messages)
                        position = head.scanned
                    confirmed = head.scanned
                    self.published += len(head.records)
                    backoff.reset()  # only a confirmed publish says the broker is fine again
                # The saved position only bounds what a restart publishes again (the broker and
                # the inbox drop the copies): saving it after every hop cost a write (an fsync on
                # SQLite) on the path of every step. At most every `track_every` seconds instead.
                if confirmed != tracked and (loop.time() - saved_at >= self.track_every or stop.is_set()):
                    crash_point("relay.after_publish")
                    await asyncio.to_thread(self.store.track, self.name, confirmed)
                    tracked, saved_at = confirmed, loop.time()
                if len(pending) >= self.in_flight:
                    await asyncio.wait({pending[0].task})
                    continue
                self._wake.clear()  # before the read: a poke from here on is for what it may miss
                records, scanned = await asyncio.to_thread(self.store.follow, position, self.batch, ["StepScheduled"])
                more = scanned > position and len(records) >= self.batch
                position = scanned  # past the other events too: the next read does not walk them again
                if records:
                    records, messages = await self._messages(records)
                    task = asyncio.ensure_future(traced_publish(self.transport.publish_many, messages))
                    pending.append(_Batch(scanned, records, messages, task))
                    if more:
                        continue  # a full batch: there may be more behind it right now
                if pending:
                    # Until the oldest publish is acked, or something new is appended.
                    woken = asyncio.ensure_future(self._wake.wait())
                    try:
                        await asyncio.wait({pending[0].task, woken}, timeout=self.poll_interval,
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        woken.cancel()
                    continue
            except Exception:  # the broker or the database is away: wait, then go on
                for batch in pending:
                    batch.task.cancel()
                pending.clear()
                await backoff.failed(stop, log, "relay: a publish")
                tracked = await _position_or(self.store, self.name, tracked)
                position = confirmed = tracked  # republish what was not confirmed: the broker drops duplicates
                continue
            wait = self.poll_interval
            if confirmed != tracked:
                wait = min(wait, max(0.0, self.track_every - (loop.time() - saved_at)))
            await sleep_or_stop(stop, wait, wake=self._wake)
        if pending:  # a stop: what was acked meanwhile is saved, the rest is published again next time
            await asyncio.wait([b.task for b in pending], timeout=1.0)
            while pending and pending[0].task.done() and not pending[0].task.cancelled() \
                    and pending[0].task.exception() is None:
                confirmed = pending.popleft().scanned
        for batch in pending:
            batch.task.cancel()
        if confirmed != tracked:
            try:
                await asyncio.to_thread(self.store.track, self.name, confirmed)
            except Exception:  # noqa: BLE001 - the store is away: a restart republishes, the broker drops copies
                log.warning("relay: could not save its position at stop; it will publish some commands again")

    async def _messages(self, records: list[StoredRecord]) -> tuple[list[StoredRecord], list[OutMessage]]:
        """The commands of `records`; a record none can be built from fails its step instead."""
        kept, messages = [], []
        for rec in records:
            try:
                messages.append(to_message(rec))
            except Exception as exc:  # noqa: BLE001 - a stored record we cannot read: never any better later
                await self._give_up(rec, "UndeliverableStep", f"no command can be built from it: {type(exc).__name__}: {exc}")
                continue
            kept.append(rec)
        return kept, messages

    async def _publish_apart(self, records: Sequence[StoredRecord], messages: Sequence[OutMessage]) -> None:
        """Publish a batch holding a message the broker will never take: halves that are refused
        are split again, so the good ones go in a few calls and each bad one is found alone."""
        try:
            await self.transport.publish_many(messages)
            return
        except MessageRejected as exc:
            if len(messages) == 1:
                await self._give_up(records[0], type(exc).__name__, f"its StepReady cannot be published: {exc}")
                return
        half = len(messages) // 2
        await self._publish_apart(records[:half], messages[:half])
        await self._publish_apart(records[half:], messages[half:])

    async def _give_up(self, rec: StoredRecord, error_type: str, reason: str) -> None:
        """Fail the step of a record that can never be published (through the execution service, the
        one writer of executions), so its execution ends and the relay can go on past it."""
        self.undeliverable += 1
        self._throttled.failure(f"undeliverable:{error_type}", "relay: a step cannot be sent to workers, so it "
                                "is failed and dead-lettered (execution %s, position %d): %s",
                                rec.stream_id, rec.position, reason)
        try:
            e = orjson.loads(rec.data)
            command = Undeliverable(str(e["step_id"]), e.get("item"), int(e["attempt"]), error_type, reason)
        except Exception as exc:  # noqa: BLE001 - not even the step can be told: nothing to fail
            self._throttled.failure("unreadable", "relay: record at position %d is unreadable, skipped: %s",
                                    rec.position, exc)
            return
        try:
            await asyncio.to_thread(self.executions.command, str(rec.stream_id), command)
        except NotFound:
            self._throttled.failure("no-execution", "relay: record at position %d names no execution, skipped",
                                    rec.position)


async def _position_or(store: EventStore, name: str, fallback: int) -> int:
    try:
        return await asyncio.to_thread(store.position, name)
    except Exception:
        return fallback
