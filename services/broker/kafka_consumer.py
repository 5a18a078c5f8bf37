"""Deliveries and consumers of the Kafka adapter (`KafkaTransport.consumer`).

Kafka keeps one committed offset per partition and group, not an ack per message. This consumer
gives the port's per-message promises on top of it, as Confluent's parallel consumer does:

- Records are fetched ahead (up to max_ack_pending not yet settled) and handed out in parallel,
  also within one partition: a slow message holds back only itself.
- Each partition keeps its fetched records in offset order. An ack marks one done; the committed
  offset moves to the end of the contiguous done prefix, never past an unsettled record. So the
  offset is committed only after what the caller did before acking (the store commit, the result
  publish), and a process that dies leaves its unsettled records, and maybe some settled after
  them, to be delivered again to the group member that takes the partition over (dedup by the
  inbox and attempt ids makes that harmless).
- nak puts the record back, at once or after its delay (a timer here, while its offset stays
  uncommitted); in_progress pushes its ack-wait deadline out; a delivery not settled by its
  deadline is handed out again. After max_deliver deliveries the record is dead-lettered (kind
  `max_deliver`) and counted done.
- Delivery counts survive the process: before records are handed out, the counts of what each
  partition has out are written to the group's marks topic (`services.broker.kafka_marks`), and a
  partition's new owner reads them back on assignment. So a record that kills every process it
  reaches comes back with its count grown, and the crash guard can dead-letter it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from contracts.deadletters import message_key
from services.broker.kafka_marks import DeliveryMarks
from services.broker.ports import BrokerError

if TYPE_CHECKING:
    from services.broker.kafka import KafkaTransport

log = logging.getLogger("services.broker.kafka")

# A foreign record's key, kept among its headers (the CloudEvents Kafka binding maps it to `partitionkey`).
PARTITION_KEY_HEADER = "weft-kafka-key"
PARTITION_SHIFT = 48
RECENT_IDS, RECENT_FOR = 50_000, 120.0  # msg ids settled here that a copy is dropped for (NATS's window)  # stream_seq = partition << 48 | (offset + 1): unique per topic, offset + 1 on partition 0


@dataclass(slots=True, eq=False)
class _Record:
    tp: TopicPartition
    offset: int
    subject: str
    data: bytes
    headers: dict[str, str]
    msg_id: str | None
    stream_seq: int
    delivered: int = 0
    done: bool = False
    revoked: bool = False
    deadline: float = math.inf  # when the delivery out now expires (inf: none is out)
    current: KafkaDelivery | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True, eq=False)
class KafkaDelivery:
    subject: str
    data: bytes
    headers: dict[str, str]
    msg_id: str | None
    delivered: int
    stream_seq: int
    _consumer: KafkaConsumer = field(repr=False)
    _record: _Record = field(repr=False)

    async def ack(self) -> None:
        # Any delivery's ack completes the record, also one the ack wait handed out again:
        # its effect is durable, which is all an ack says.
        self._consumer._settle(self._record)

    async def nak(self, delay: float | None = None) -> None:
        if self._record.current is self:
            self._consumer._again(self._record, delay if delay and delay > 0 else 0.0)

    async def in_progress(self) -> None:
        if self._record.current is self and not self._record.done:
            self._record.deadline = asyncio.get_running_loop().time() + self._consumer.ack_wait

    async def term(self) -> None:
        self._consumer._settle(self._record)


class _Partition:
    def __init__(self) -> None:
        self.records: deque[_Record] = deque()  # fetched, in offset order, not yet committed
        self.last = -1  # the highest offset fetched
        self.commit_to: int | None = None  # the offset to commit (next not-done), when it moved

    def advance(self) -> bool:
        moved = False
        while self.records and self.records[0].done:
            self.commit_to = self.records.popleft().offset + 1
            moved = True
        return moved


class KafkaConsumer:
    """A consumer group member on one topic; see the module docstring."""

    def __init__(self, transport: KafkaTransport, stream: str, durable: str, *, filter_subject: str | None,
                 ack_wait: float, max_deliver: int, max_ack_pending: int) -> None:
        from services.broker.kafka import subject_matches

        self._transport, self.stream, self.durable = transport, stream, durable
        self.topic = transport.stream_name(stream)
        self._matches = (lambda s: subject_matches(filter_subject, s)) if filter_subject else (lambda s: True)
        self.ack_wait, self.max_deliver, self.max_ack_pending = ack_wait, max_deliver, max(1, max_ack_pending)
        self._parts: dict[TopicPartition, _Partition] = {}
        self._ready: asyncio.Queue[_Record] = asyncio.Queue()
        self._unsettled = 0
        self._out: set[_Record] = set()  # handed out and not settled: what the ack-wait watchdog looks at
        # Dedup by msg id on receipt: a copy of a message this process holds or settled recently (a
        # relay that crashed before saving its position publishes again) is passed over, as
        # JetStream's duplicate window would have dropped it. Same key, same partition: the copy
        # comes to the process that has the first one.
        self._holding: dict[str, _Record] = {}
        self._settled_ids: OrderedDict[str, float] = OrderedDict()
        self.duplicates = 0
        self._dirty = asyncio.Event()
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._fetch_lock = asyncio.Lock()
        self.unacked_at_start = 1  # unknown: a crashed member's records may come first (services.broker.redelivery)
        self.dead_lettered = 0
        self._marks = DeliveryMarks(transport, self.topic, transport.group_id(stream, durable))
        self._prior: dict[TopicPartition, dict[int, int]] = {}  # counts read back on assignment, by offset
        session = int(transport.session_timeout * 1000)
        self._kc = AIOKafkaConsumer(
            self.topic, bootstrap_servers=transport.servers, group_id=transport.group_id(stream, durable),
            enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=session,
            heartbeat_interval_ms=max(100, session // 6), rebalance_timeout_ms=max(session, 10_000),
            max_poll_interval_ms=300_000, max_poll_records=500, fetch_max_wait_ms=transport.fetch_wait_ms,
            client_id=f"weft-{durable}",
        )

    async def start(self) -> None:
        await self._marks.start()
        self._kc.subscribe([self.topic], listener=_Listener(self))
        await self._kc.start()
        self._tasks = [asyncio.ensure_future(self._pump()), asyncio.ensure_future(self._commits()),
                       asyncio.ensure_future(self._watch())]

    # ---- the port ---------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> list[KafkaDelivery]:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        if self._closed:
            raise BrokerError("consumer is closed", operation="fetch", stream=self.topic)
        async with self._fetch_lock:
            try:
                first = await asyncio.wait_for(self._next(), timeout=max(float(timeout), 0.001))
            except asyncio.TimeoutError:
                return []
            taken = [first]
            while len(taken) < max_messages and not self._ready.empty():
                record = self._ready.get_nowait()
                if not (record.done or record.revoked or record.current is not None):
                    taken.append(record)
            try:
                await self._mark(taken)
            except BrokerError:
                for record in taken:  # not handed out: they wait for the next fetch
                    self._ready.put_nowait(record)
                raise
            return [self._hand_out(r) for r in taken if not (r.done or r.revoked or r.current is not None)]

    async def _mark(self, taken: list[_Record]) -> None:
        """Write, durably, the counts `taken` will have once handed out, before the handler can crash
        on them: each touched partition's snapshot of what it has out (services.broker.kafka_marks)."""
        touched, chosen = {r.tp for r in taken}, set(taken)
        await asyncio.gather(*(self._marks.write(tp.partition, {
            r.offset: r.delivered + (1 if r in chosen else 0) for r in self._parts[tp].records
            if not (r.done or r.revoked) and (r.delivered or r in chosen)}) for tp in touched if tp in self._parts))

    async def _next(self) -> _Record:
        while True:
            record = await self._ready.get()
            if not (record.done or record.revoked or record.current is not None):
                return record

    def _hand_out(self, record: _Record) -> KafkaDelivery:
        self._out.add(record)
        record.delivered += 1
        record.deadline = asyncio.get_running_loop().time() + self.ack_wait
        record.current = KafkaDelivery(record.subject, record.data, record.headers, record.msg_id, record.delivered,
                                       record.stream_seq, self, record)
        return record.current

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport._consumers.discard(self)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._commit()  # what was settled before the close is not delivered again
        await self._marks.close()
        try:
            await self._kc.stop()
        except (KafkaError, OSError) as exc:
            log.debug("kafka: stopping consumer %s: %s", self.durable, exc)

    async def lag(self) -> int:
        total = 0
        for tp in self._kc.assignment():
            high = self._kc.highwater(tp)
            committed = self._parts[tp].commit_to if tp in self._parts else None
            if high is not None:
                total += max(0, high - (committed if committed is not None else (await self._kc.committed(tp) or 0)))
        return total

    # ---- settling ---------------------------------------------------------

    def _settle(self, record: _Record) -> None:
        if record.done or record.revoked:
            return
        record.done, record.current, record.deadline = True, None, math.inf
        if record.timer is not None:
            record.timer.cancel()
        self._out.discard(record)
        if record.msg_id:
            self._holding.pop(record.msg_id, None)
            self._remember(record.msg_id)
        # Only its offset matters now; a record stuck before it (a long nak delay) may keep it a while.
        record.data, record.headers = b"", {}
        self._unsettled -= 1
        part = self._parts.get(record.tp)
        if part is not None and part.advance():
            self._dirty.set()

    def _again(self, record: _Record, delay: float) -> None:
        """Hand `record` out again (after `delay`), or dead-letter it when it had max_deliver deliveries."""
        if record.done or record.revoked:
            return
        record.current, record.deadline = None, math.inf
        self._out.discard(record)
        if 0 < self.max_deliver <= record.delivered:
            task = asyncio.ensure_future(self._max_delivered(record))
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)
            return
        if delay > 0:
            record.timer = asyncio.get_running_loop().call_later(delay, self._ready.put_nowait, record)
        else:
            self._ready.put_nowait(record)

    async def _max_delivered(self, record: _Record) -> None:
        delay = 0.2
        while not (record.done or record.revoked or self._closed):
            try:
                await self._transport.dead_letter(
                    "max_deliver", record.data,
                    reason=f"delivered {record.delivered} times to consumer {self.durable!r} without an ack "
                           "(MaxDeliver reached)",
                    headers=record.headers, source_subject=record.subject, delivered=record.delivered,
                    msg_id=message_key(self.stream, record.stream_seq),
                )
            except BrokerError as exc:
                log.warning("kafka: cannot dead-letter %s#%d yet: %s", self.stream, record.stream_seq, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.dead_lettered += 1
            log.warning("kafka: message %s#%d exceeded max_deliver on %s; dead-lettered",
                        self.stream, record.stream_seq, self.durable)
            self._settle(record)

    def _remember(self, msg_id: str) -> None:
        now = time.monotonic()
        ids = self._settled_ids
        ids[msg_id] = now
        ids.move_to_end(msg_id)
        while ids and (len(ids) > RECENT_IDS or next(iter(ids.values())) < now - RECENT_FOR):
            ids.popitem(last=False)

    # ---- background -------------------------------------------------------

    async def _pump(self) -> None:
        """Fetch ahead while fewer than max_ack_pending records are unsettled; keep polling (paused)
        when full, so the group does not take us for dead."""
        paused = False
        while not self._closed:
            full = self._unsettled >= self.max_ack_pending
            if full != paused:
                assigned = self._kc.assignment()
                (self._kc.pause if full else self._kc.resume)(*assigned)
                paused = full
            try:
                batches = await self._kc.getmany(timeout_ms=100, max_records=max(1, min(
                    500, self.max_ack_pending - self._unsettled)))
            except (KafkaError, OSError) as exc:
                log.warning("kafka: fetch on %s failed: %s: %s", self.topic, type(exc).__name__, exc)
                await asyncio.sleep(0.5)
                continue
            fresh = sorted((tp for tp in batches if tp not in self._parts), key=lambda tp: tp.partition)
            if fresh:  # newly ours: first the counts its earlier owners wrote (not in the rebalance
                # callback, which aiokafka runs while the fetcher already fetches)
                for partition, counts in (await self._marks.read([tp.partition for tp in fresh])).items():
                    self._prior[TopicPartition(self.topic, partition)] = counts
            for tp, records in batches.items():
                if tp not in self._kc.assignment():
                    continue  # revoked while the counts were read
                part = self._parts.setdefault(tp, _Partition())
                for r in records:
                    if r.offset <= part.last:  # fetched again after a seek: we have it already
                        continue
                    part.last = r.offset
                    self._add(tp, part, r)
                if part.advance():
                    self._dirty.set()

    def _add(self, tp: TopicPartition, part: _Partition, r: Any) -> None:
        from services.broker.kafka import MSG_ID_HEADER, SUBJECT_HEADER, topic_subject

        headers = {k: (v or b"").decode("utf-8", "replace") for k, v in (r.headers or ())}
        subject = headers.pop(SUBJECT_HEADER, None)
        if subject is None:  # a producer that is not Weft: it addressed the topic, nothing finer
            subject = topic_subject(self.stream)
            if r.key is not None and PARTITION_KEY_HEADER not in headers:
                headers[PARTITION_KEY_HEADER] = r.key.decode("utf-8", "replace")
        msg_id = headers.pop(MSG_ID_HEADER, None)
        record = _Record(tp, r.offset, subject, r.value or b"", headers, msg_id,
                         (tp.partition << PARTITION_SHIFT) | (r.offset + 1))
        record.delivered = self._prior.get(tp, {}).pop(r.offset, 0)  # deliveries by earlier owners
        part.records.append(record)
        if not self._matches(subject) and subject != topic_subject(self.stream):
            record.done = True  # not this durable's: passed over, as a filtered NATS consumer does
            return
        if msg_id and (msg_id in self._holding or msg_id in self._settled_ids):
            record.done = True
            self.duplicates += 1
            return
        if msg_id:
            self._holding[msg_id] = record
        self._unsettled += 1
        if 0 < self.max_deliver <= record.delivered:
            self._again(record, 0.0)  # delivered max_deliver times before, by processes now gone: dead-letter it
            return
        self._ready.put_nowait(record)

    async def _watch(self) -> None:
        """Hand out again what was not settled within its ack wait (the worker died or hangs)."""
        loop = asyncio.get_running_loop()
        tick = min(max(self.ack_wait / 4, 0.05), 1.0)
        while not self._closed:
            await asyncio.sleep(tick)
            now = loop.time()
            for record in [r for r in self._out if r.deadline < now]:
                self._again(record, 0.0)

    async def _commits(self) -> None:
        while not self._closed:
            await self._dirty.wait()
            self._dirty.clear()
            await self._commit()

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        offsets = {tp: p.commit_to for tp, p in self._parts.items()
                   if p.commit_to is not None and (only is None or tp in only)}
        if not offsets:
            return
        try:
            await self._kc.commit(offsets)  # type: ignore[arg-type]
        except (KafkaError, OSError, AssertionError) as exc:
            # A rebalance under way, or the broker away: the offsets stay, the next commit takes them.
            log.debug("kafka: commit on %s failed: %s: %s", self.topic, type(exc).__name__, exc)
            self._dirty.set()
            await asyncio.sleep(0.2)
            return
        for tp, offset in offsets.items():
            part = self._parts.get(tp)
            if part is not None and part.commit_to == offset:
                part.commit_to = None

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        await self._commit(set(revoked))
        for tp in revoked:
            self._prior.pop(tp, None)
            part = self._parts.pop(tp, None)
            if part is None:
                continue
            for record in part.records:
                if not record.done:
                    self._unsettled -= 1
                self._out.discard(record)
                if record.msg_id and self._holding.get(record.msg_id) is record:
                    del self._holding[record.msg_id]
                record.revoked = True  # its new owner delivers it again; an ack from here is moot
                if record.timer is not None:
                    record.timer.cancel()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: KafkaConsumer) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.consumer._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None
