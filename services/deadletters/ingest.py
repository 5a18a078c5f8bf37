"""From the broker into the store: the DLQ ingester and the MaxDeliver capture.

`Ingester` follows the DLQ stream with a durable consumer and records each
dead letter as `DeadLetterRecorded`, version 1 of its own stream (the id
derives from the source message, `Weft-Dlq-Msg-Id`). It acks only after the
append committed; a redelivery then conflicts on version 1 and is acked as a
duplicate, while the same source message dead-lettered again later (a new DLQ
message) becomes `DeadLetterSeen`. Any bytes are a valid dead letter: nothing
here can turn a message into a crash loop; only an unreachable store stops
the acks, and then everything is redelivered.

`MaxDeliverCapture` follows JetStream's MaxDeliver advisories through a
durable stream that captures them (so none is missed while we are down),
fetches the abandoned message by its stream sequence and dead-letters it
(kind `max_deliver`), then removes it from its work queue and acks.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import orjson

from contracts import deadletters as dl
from contracts.subjects import DLQ_PREFIX, DLQ_STREAM, RESULTS_STREAM, STEPS_STREAM
from services.broker import Consumer, Delivery, Transport
from services.faults import crash_point
from services.orchestrator.executions import utcnow
from services.retrying import Backoff
from services.store import ConcurrencyError, EventStore, NewEvent

log = logging.getLogger("weft.deadletters")
DURABLE = "deadletters"
MAX_DELIVER_DURABLE = "deadletters-maxdeliver"
WORK_QUEUES = (STEPS_STREAM, RESULTS_STREAM)  # an abandoned message stays there until removed


def recorded_from(msg: Delivery, at: datetime) -> dl.DeadLetterRecorded:
    """The store's record of one DLQ message. Never raises: garbage is a dead letter too."""
    headers = dict(msg.headers or {})
    kind = headers.get(dl.KIND_HEADER) or msg.subject.removeprefix(DLQ_PREFIX + ".") or "unknown"
    try:
        delivered = max(int(headers.get(dl.DELIVERED_HEADER) or 0), 0)
    except ValueError:
        delivered = 0
    # The source message's identity names the dead letter; a message published straight
    # onto the DLQ without one is known by its place in the DLQ stream.
    key = headers.get(dl.MSG_ID_HEADER) or msg.msg_id or f"dlq-seq:{msg.stream_seq}"
    payload, encoding = dl.encode_payload(msg.data)
    return dl.DeadLetterRecorded(
        at=at, dead_letter_id=dl.message_dead_letter_id(key), kind=kind, key=key,
        source_subject=headers.get(dl.SOURCE_SUBJECT_HEADER, ""), payload=payload, payload_encoding=encoding,
        headers={k: v for k, v in headers.items() if k not in dl.DLQ_HEADERS},
        reason=headers.get(dl.REASON_HEADER, ""), delivered=delivered, dlq_seq=msg.stream_seq,
    )


def _stream(dead_letter_id: str) -> uuid.UUID:
    return uuid.UUID(dead_letter_id)


def store_letters(store: EventStore, letters: Sequence[dl.DeadLetterRecorded]) -> dict[str, int]:
    """Record a batch in one transaction; on any conflict, one at a time. Returns counts by outcome."""
    counts = {"recorded": 0, "duplicate": 0, "seen_again": 0}
    ids = [x.dead_letter_id for x in letters]
    if len(set(ids)) == len(ids):
        try:
            store.append([NewEvent(_stream(x.dead_letter_id), 1, x.type, dl.encode(x)) for x in letters])
            counts["recorded"] = len(letters)
            return counts
        except ConcurrencyError:
            pass  # a redelivery, or a message seen before: sort them out one by one
    for x in letters:
        counts[_store_one(store, x)] += 1
    return counts


def _store_one(store: EventStore, letter: dl.DeadLetterRecorded) -> str:
    sid = _stream(letter.dead_letter_id)
    for _ in range(20):
        records = store.load(sid)
        if not records:
            try:
                store.append([NewEvent(sid, 1, letter.type, dl.encode(letter))])
                return "recorded"
            except ConcurrencyError:
                continue
        if any(orjson.loads(r.data).get("dlq_seq") == letter.dlq_seq for r in records
               if r.type in ("DeadLetterRecorded", "DeadLetterSeen")):
            return "duplicate"  # this very DLQ message was stored before the last crash
        seen = dl.DeadLetterSeen(
            at=letter.at, dead_letter_id=letter.dead_letter_id, kind=letter.kind, reason=letter.reason,
            delivered=letter.delivered, dlq_seq=letter.dlq_seq,
        )
        try:
            store.append([NewEvent(sid, records[-1].version + 1, seen.type, dl.encode(seen))])
            return "seen_again"
        except ConcurrencyError:
            continue
    raise ConcurrencyError(f"dead letter {letter.dead_letter_id}: too much contention", kind="version")


class Ingester:
    def __init__(
        self, store: EventStore, transport: Transport, *, batch: int = 256, ack_wait: float = 30.0,
        linger: float = 0.5, clock: Callable[[], datetime] = utcnow,
    ):
        self.store, self.transport, self.batch, self.ack_wait, self.clock = store, transport, batch, ack_wait, clock
        self.linger = linger
        self.counts = {"recorded": 0, "duplicate": 0, "seen_again": 0}
        self.consumer: Consumer | None = None
        self.stored: Callable[[], None] = lambda: None  # told after each batch is in the store

    async def run(self, stop: asyncio.Event) -> None:
        # Unlimited deliveries: a dead letter must never itself be given up on.
        self.consumer = await self.transport.consumer(
            DLQ_STREAM, DURABLE, ack_wait=self.ack_wait, max_deliver=-1, max_ack_pending=self.batch * 2,
        )
        backoff = Backoff()
        while not stop.is_set():
            try:
                msgs = await self._gather(self.consumer)
                if msgs:
                    await self.handle(msgs)
                backoff.reset()
            except Exception:  # the store or the broker is away: nothing acked, all comes back
                await backoff.failed(stop, log, "deadletters: batch")
        await self.consumer.close()

    async def _gather(self, consumer: Consumer) -> list[Delivery]:
        """A batch: the first message, then whatever followed within `linger`. Dead letters can
        wait a moment (they are safe in the DLQ stream). Part of what a batch costs is per
        batch: an append that holds the events table's lock, and a catch-up of the view.
        In a flood, fewer and larger batches leave the healthy executions more of the store
        and of the interpreter (the rows themselves cost the same either way: measured alone,
        250 to a batch, ~27 µs of PostgreSQL's CPU and ~45 µs of this process's per dead
        letter, the view's row included). The followers are taken in one fetch after the
        linger, not in a fetch each."""
        msgs = list(await consumer.fetch(self.batch, timeout=0.5))
        if not msgs or len(msgs) >= self.batch or self.linger <= 0:
            return msgs
        await asyncio.sleep(self.linger)
        return msgs + list(await consumer.fetch(self.batch - len(msgs), timeout=0.01))

    async def handle(self, msgs: Sequence[Delivery]) -> None:
        at = self.clock()
        letters = [recorded_from(m, at) for m in msgs]
        counts = await asyncio.to_thread(store_letters, self.store, letters)
        crash_point("deadletters.after_store")
        for m in msgs:
            await m.ack()
        for k, n in counts.items():
            self.counts[k] += n
        self.stored()
        if counts["recorded"]:
            log.info("deadletters: recorded %d dead letter(s)", counts["recorded"])


# ---- MaxDeliver -----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SourceMessage:
    subject: str  # logical
    data: bytes
    headers: dict[str, str]


class MessageArchive(Protocol):
    """What the capture needs from the broker beyond the Transport port."""

    advisory_stream: str  # logical name of the stream that captures MaxDeliver advisories

    async def ensure(self) -> None: ...
    def logical_stream(self, physical: str) -> str | None: ...
    async def get(self, logical_stream: str, seq: int) -> SourceMessage | None: ...
    async def delete(self, logical_stream: str, seq: int) -> None: ...


class MaxDeliverCapture:
    def __init__(self, transport: Transport, archive: MessageArchive, *, ack_wait: float = 30.0):
        self.transport, self.archive, self.ack_wait = transport, archive, ack_wait
        self.captured = 0

    async def run(self, stop: asyncio.Event) -> None:
        consumer: Consumer | None = None
        backoff = Backoff()
        while not stop.is_set():
            try:
                if consumer is None:  # set up inside the loop: a broker that says no now may say yes later
                    await self.archive.ensure()
                    consumer = await self.transport.consumer(
                        self.archive.advisory_stream, MAX_DELIVER_DURABLE, ack_wait=self.ack_wait, max_deliver=-1,
                    )
                for msg in await consumer.fetch(32, timeout=0.5):
                    await self.handle(msg)
                backoff.reset()
            except Exception:
                await backoff.failed(stop, log, "deadletters: MaxDeliver capture")
        if consumer is not None:
            await consumer.close()

    async def handle(self, msg: Delivery) -> None:
        try:
            body = orjson.loads(msg.data)
            physical, consumer = str(body["stream"]), str(body["consumer"])
            seq, deliveries = int(body["stream_seq"]), int(body["deliveries"])
        except (ValueError, KeyError, TypeError) as exc:
            # It stays in the advisory stream (kept for days) for anyone to look at.
            log.warning("deadletters: unreadable MaxDeliver advisory: %s", exc)
            await msg.ack()
            return
        stream = self.archive.logical_stream(physical)
        source = await self.archive.get(stream, seq) if stream else None
        if stream is None or source is None:
            # Gone: moved here before a crash (the dead letter was stored first), or acked late after all.
            await msg.ack()
            return
        await self.transport.dead_letter(
            "max_deliver", source.data,
            reason=f"delivered {deliveries} times to consumer {consumer!r} without an ack (MaxDeliver reached)",
            headers=source.headers, source_subject=source.subject, delivered=deliveries,
            msg_id=dl.message_key(stream, seq),  # the same identity a poison dead letter of this message has
        )
        crash_point("deadletters.after_max_deliver_store")
        if stream in WORK_QUEUES:
            await self.archive.delete(stream, seq)  # moved, not copied: it would sit in the queue forever
        await msg.ack()
        self.captured += 1
        log.warning("deadletters: message %s#%d exceeded MaxDeliver on %s; dead-lettered", stream, seq, consumer)
