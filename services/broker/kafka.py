"""Kafka adapter of the broker port (`services.broker.ports.Transport`), on aiokafka.

Names. Each logical stream of `contracts.subjects.STREAMS` is one topic (the stream name, with the
namespace as a suffix like the NATS adapter's); the logical subject travels in a header, so that a
consumer's `filter_subject` and the dead-letter store's "republish to where it came from" work as on
NATS, and a republished message lands on the topic it came from. A durable is a consumer group.

Ordering and scale. Messages are keyed by `OutMessage.key` (the execution id for commands and
results), so one execution's messages share a partition and the group's members split the
partitions between them.

Dedup. Kafka has no publish-side message id (the idempotent producer dedups only a producer's own
retries, and Tansu refuses it), so the msg_id travels as a header and the receivers' inbox and
deterministic attempt ids make a duplicate harmless. A bounded window of recently published ids in
this process drops the cheap cases (a relay re-publishing what it just sent) and lets publish()
answer False for them, as NATS does within its duplicate window.

Acks, redelivery, heartbeats, delays and max-deliver are the consumer's job: see
`services.broker.kafka_consumer` and docs/kafka.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, MessageSizeTooLargeError

from contracts import subjects as contract_subjects
from services.broker.kafka_consumer import KafkaConsumer, KafkaDelivery
from services.broker.letters import dead_letter_message
from services.broker.oversize import BlobSink, fit
from services.broker.ports import BrokerError, DeadLetter, MessageRejected, OutMessage, PayloadTooLarge

__all__ = ["KafkaConsumer", "KafkaDelivery", "KafkaTransport", "SUBJECT_HEADER", "MSG_ID_HEADER", "parse_url"]

log = logging.getLogger(__name__)

SUBJECT_HEADER = "weft-kafka-subject"
MSG_ID_HEADER = "weft-kafka-msg-id"
MAX_MESSAGE_BYTES = 1_000_000  # under Kafka's default message.max.bytes (1 MiB + overhead)
RECENT_IDS = 50_000  # the in-process dedup window: at most this many ids ...
RECENT_FOR = 120.0  # ... for at most this long (NATS's duplicate window)
T = TypeVar("T")


def parse_url(url: str) -> list[str]:
    """`kafka://host:port[,host:port...]` -> bootstrap servers. ValueError names what is wrong."""
    if not url.startswith("kafka://"):
        raise ValueError(f"broker url must start with kafka://, got {url[:40]!r}")
    servers = [s.strip() for s in url[len("kafka://"):].strip("/").split(",") if s.strip()]
    if not servers:
        raise ValueError("kafka:// url names no host:port")
    for s in servers:
        host, _, port = s.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"kafka:// url: {s!r} is not host:port")
    return servers


def topic_subject(stream: str) -> str:
    """The subject a record gets when its producer did not name one (any Kafka client, writing to
    the topic with the CloudEvents Kafka binding, say): the stream's root, `weft.triggers`."""
    return contract_subjects.STREAMS[stream][0].removesuffix(".>")


def stream_of(subject: str) -> str:
    """The logical stream that captures `subject` (contracts.subjects.STREAMS), or whose root it is."""
    for stream, captured in contract_subjects.STREAMS.items():
        for pattern in captured:
            if subject_matches(pattern, subject) or subject == topic_subject(stream):
                return stream
    raise MessageRejected(f"subject {subject[:200]!r} belongs to no stream", operation="publish", subject=subject[:200])


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS-style subject match (`*` one token, a trailing `>` one or more), the filter language of the port."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


class KafkaTransport:
    """The broker port on Kafka. Build it with `await KafkaTransport.connect(url)`."""

    captures_max_deliver = True  # its consumers dead-letter what exceeds max_deliver themselves
    cloudevents_binding = "kafka"  # trigger records follow the CloudEvents Kafka binding (ce_* headers)

    def __init__(self, servers: list[str], *, namespace: str = "", partitions: int = 8,
                 request_timeout: float = 10.0, publish_retry_for: float = 30.0,
                 session_timeout: float = 6.0, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 fetch_wait: float = 0.01) -> None:
        self.servers, self.namespace = servers, namespace
        self.partitions = partitions
        self._suffix = f"_{namespace.upper()}" if namespace else ""
        self._request_timeout, self._publish_retry_for = request_timeout, publish_retry_for
        self.session_timeout = session_timeout
        self.max_message_bytes = max_message_bytes
        # How long the broker may hold an empty fetch. Kafka answers as soon as a record comes;
        # a broker that waits the whole time (Tansu) adds half of it to every dispatch on average.
        self.fetch_wait_ms = max(1, int(fetch_wait * 1000))
        self._producer: AIOKafkaProducer | None = None
        self._consumers: set[KafkaConsumer] = set()
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._closing = False
        self.blob_sink: BlobSink | None = None

    @classmethod
    async def connect(cls, url: str, *, namespace: str = "", connect_timeout: float = 10.0,
                      **kw: Any) -> KafkaTransport:
        """Connect the producer, retrying for up to connect_timeout."""
        t = cls(parse_url(url), namespace=namespace, **kw)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=t.servers, acks="all", enable_idempotence=False,
                max_request_size=max(t.max_message_bytes + 64 * 1024, 1_048_576), linger_ms=1,
                request_timeout_ms=int(t._request_timeout * 1000), client_id=f"weft-{namespace or 'default'}",
            )
            try:
                await asyncio.wait_for(producer.start(), timeout=max(0.5, deadline - loop.time()))
                t._producer = producer
                return t
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                await _quietly(producer.stop())
                if loop.time() + 0.5 >= deadline:
                    raise BrokerError(f"cannot connect to Kafka at {','.join(t.servers)} within {connect_timeout:g}s",
                                      operation="connect", retryable=True) from exc
                await asyncio.sleep(0.5)

    async def __aenter__(self) -> KafkaTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- names ----------------------------------------------------------

    def stream_name(self, logical: str) -> str:
        return f"{logical}{self._suffix}"

    def group_id(self, stream: str, durable: str) -> str:
        return f"weft.{self.stream_name(stream)}.{durable}"

    @property
    def is_connected(self) -> bool:
        client = getattr(self._producer, "client", None)
        return bool(client is not None and not self._closing and client.cluster.brokers())

    # ---- topics ---------------------------------------------------------

    async def ensure_streams(self) -> None:
        # The DLQ is one partition: its offsets are then its sequence numbers (dlq_seq), in order.
        wanted = {self.stream_name(s): (1 if s == contract_subjects.DLQ_STREAM else self.partitions)
                  for s in contract_subjects.STREAMS}
        admin = AIOKafkaAdminClient(bootstrap_servers=self.servers, request_timeout_ms=int(self._request_timeout * 1000))
        try:
            await self._retrying("ensure_streams", admin.start)
            existing = set(await self._retrying("ensure_streams", admin.list_topics))
            missing = [NewTopic(name, n, 1) for name, n in wanted.items() if name not in existing]
            if missing:
                response = await self._retrying("ensure_streams", lambda: admin.create_topics(missing))
                for topic, code, *rest in getattr(response, "topic_errors", []):
                    if code not in (0, 36):  # 36: it exists already (another process made it first)
                        raise BrokerError(f"cannot create topic: error {code} {rest[0] if rest else ''}",
                                          operation="ensure_streams", stream=topic)
        finally:
            await _quietly(admin.close())

    # ---- publishing -------------------------------------------------------

    def _record(self, message: OutMessage) -> tuple[str, bytes | None, list[tuple[str, bytes]]]:
        topic = self.stream_name(stream_of(message.subject))
        headers = [(k, v.encode()) for k, v in (message.headers or {}).items()
                   if k not in (SUBJECT_HEADER, MSG_ID_HEADER)]
        headers.append((SUBJECT_HEADER, message.subject.encode()))
        if message.msg_id:
            headers.append((MSG_ID_HEADER, message.msg_id.encode()))
        key = message.key.encode() if message.key else None
        size = len(message.data) + sum(len(k) + len(v) for k, v in headers) + len(key or b"")
        if size > self.max_message_bytes:
            raise PayloadTooLarge(size, self.max_message_bytes, subject=message.subject)
        return topic, key, headers

    def _seen(self, msg_id: str | None) -> bool:
        """Whether msg_id was published from here within the window; remembers it if not."""
        if not msg_id:
            return False
        now = time.monotonic()
        recent = self._recent
        while recent and (len(recent) > RECENT_IDS or next(iter(recent.values())) < now - RECENT_FOR):
            recent.popitem(last=False)
        if msg_id in recent:
            return True
        recent[msg_id] = now
        return False

    async def publish(self, message: OutMessage) -> bool:
        topic, key, headers = self._record(message)
        if self._seen(message.msg_id):
            return False
        try:
            await self._retrying("publish", lambda: self._send(topic, message.data, key, headers),
                                 subject=message.subject)
        except BaseException:
            self._forget(message.msg_id)
            raise
        return True

    async def publish_many(self, messages: Sequence[OutMessage]) -> None:
        records = [(m, *self._record(m)) for m in messages]
        fresh = [r for r in records if not self._seen(r[0].msg_id)]
        futures: list[asyncio.Future[Any]] = []
        try:
            # All in flight at once: the producer batches them per partition.
            for m, t, k, h in fresh:
                futures.append(await self._producer_().send(t, m.data, key=k, headers=h))
        except KafkaError as exc:
            log.debug("publish_many: send failed after %d of %d: %s", len(futures), len(fresh), exc)
        results = await asyncio.gather(*futures, return_exceptions=True)
        # What failed (or was never sent) goes again one at a time, with publish()'s retrying rules.
        for i, (m, t, k, h) in enumerate(fresh):
            if i < len(results) and not isinstance(results[i], BaseException):
                continue
            try:
                await self._retrying("publish", lambda t=t, m=m, k=k, h=h: self._send(t, m.data, k, h),  # type: ignore[misc]
                                     subject=m.subject)
            except BaseException:
                for mm, *_ in fresh[i:]:
                    self._forget(mm.msg_id)
                raise

    async def _send(self, topic: str, data: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
        return await self._producer_().send_and_wait(topic, data, key=key, headers=headers)

    def _forget(self, msg_id: str | None) -> None:
        if msg_id:
            self._recent.pop(msg_id, None)

    def _producer_(self) -> AIOKafkaProducer:
        if self._producer is None or self._closing:
            raise BrokerError("connection is closed", operation="publish")
        return self._producer

    # ---- dead letters -------------------------------------------------------

    async def dead_letter(self, kind: str, payload: bytes, *, reason: str, headers: Mapping[str, str] | None = None,
                          source_subject: str = "", delivered: int = 0, msg_id: str | None = None) -> None:
        await self.dead_letter_many([DeadLetter(kind, payload, reason, headers=headers, source_subject=source_subject,
                                                delivered=delivered, msg_id=msg_id)])

    async def dead_letter_many(self, letters: Sequence[DeadLetter]) -> None:
        fitted = await fit(letters, self.blob_sink)
        messages = [dead_letter_message(letter) for letter in fitted]
        # Not the publish window: a redelivered poison message must reach the DLQ again if the
        # first copy was lost with a crash; the ingester drops a true duplicate by its key.
        for m in messages:
            self._forget(m.msg_id)
        await self.publish_many(messages)
        for m in messages:
            self._forget(m.msg_id)

    # ---- consuming --------------------------------------------------------

    async def consumer(self, stream: str, durable: str, *, filter_subject: str | None = None, ack_wait: float = 30.0,
                       max_deliver: int = 10, max_ack_pending: int = 1000) -> KafkaConsumer:
        consumer = KafkaConsumer(self, stream, durable, filter_subject=filter_subject, ack_wait=ack_wait,
                                 max_deliver=max_deliver, max_ack_pending=max_ack_pending)
        try:
            await consumer.start()
        except (KafkaError, OSError) as exc:
            await _quietly(consumer.close())
            raise BrokerError("cannot start consumer", operation="consumer", stream=self.stream_name(stream),
                              retryable=True) from exc
        self._consumers.add(consumer)
        return consumer

    async def backlog(self, stream: str, durable: str) -> int:
        """Messages of the group not yet committed (the lag), over the partitions this process holds."""
        total = 0
        for c in list(self._consumers):
            if c.stream == stream and c.durable == durable:
                total += await c.lag()
        return total

    # ---- lifecycle --------------------------------------------------------

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for consumer in list(self._consumers):
            await _quietly(consumer.close())
        if self._producer is not None:
            await _quietly(self._producer.stop())

    async def _retrying(self, operation: str, call: Callable[[], Awaitable[T]], *, subject: str = "") -> T:
        """Run call(), retrying what Kafka calls retriable (and lost connections) until publish_retry_for."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._publish_retry_for
        delay = 0.05
        while True:
            if self._closing:
                raise BrokerError("connection is closed", operation=operation, subject=subject)
            try:
                return await call()
            except MessageSizeTooLargeError as exc:
                raise MessageRejected(f"{operation} refused: message too large", operation=operation,
                                      subject=subject) from exc
            except (KafkaError, OSError) as exc:
                transient = isinstance(exc, (KafkaConnectionError, KafkaTimeoutError, OSError)) or bool(
                    getattr(exc, "retriable", False))
                if not transient or loop.time() + delay >= deadline:
                    raise BrokerError(f"{operation} failed: {type(exc).__name__}", operation=operation,
                                      subject=subject, retryable=transient) from exc
                log.debug("%s failed (%s), retrying in %.2fs", operation, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def _quietly(closing: Awaitable[Any]) -> None:
    try:
        await closing
    except Exception as exc:  # noqa: BLE001 - closing goes on: a dead broker cannot be left politely
        log.debug("kafka: closing: %s: %s", type(exc).__name__, exc)
