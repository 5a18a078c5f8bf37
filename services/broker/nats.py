"""NATS JetStream adapter of the broker port (`services.broker.ports.Transport`).

Streams are file-backed with a 120 s duplicate window, so a publisher that
retries with the same msg id (the relay after a crash, a worker redoing a
result) stores one message. Consumers are durable pull consumers with explicit
ack. The client reconnects forever, also after the server closed the connection
(services.broker.nats_client); a call that meets a broker restart waits and
retries (bounded by `publish_retry_for`) instead of failing at once. No message
over the server's max_payload is ever sent: it is refused with PayloadTooLarge.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from contracts import subjects as contract_subjects
from contracts.deadletters import DELIVERED_HEADER as DLQ_DELIVERED_HEADER
from contracts.deadletters import KIND_HEADER as DLQ_KIND_HEADER
from contracts.deadletters import MSG_ID_HEADER as DLQ_MSG_ID_HEADER
from contracts.deadletters import REASON_HEADER as DLQ_REASON_HEADER
from contracts.deadletters import SOURCE_SUBJECT_HEADER as DLQ_SOURCE_SUBJECT_HEADER
from services.broker.nats_client import Client, wire_size
from services.broker.oversize import BlobSink, fit
from services.broker.ports import BrokerError, DeadLetter, MessageRejected, OutMessage, PayloadTooLarge

__all__ = [
    "DLQ_DELIVERED_HEADER",
    "DLQ_KIND_HEADER",
    "DLQ_MSG_ID_HEADER",
    "DLQ_REASON_HEADER",
    "DLQ_SOURCE_SUBJECT_HEADER",
    "DUPLICATE_WINDOW",
    "NatsConsumer",
    "NatsDelivery",
    "NatsTransport",
    "StoredMessage",
]

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
_DLQ_REASON_MAX = 4096  # headers share max_payload with the body; a traceback must not crowd it out

DUPLICATE_WINDOW = 120.0
TRIGGERS_MAX_AGE = 7 * 24 * 3600.0

# JetStream accepts at most 1,000 messages in one atomic batch.
ATOMIC_BATCH_MAX = 500
# Below this many messages a batch goes pipelined instead. Measured on nats-server 2.15 with
# `sync_interval: always` (2-core VM), server CPU: an atomic batch about 1.2 ms per batch plus
# 8 us per message, pipelined 85-110 us per message; they break even at about 16.
ATOMIC_BATCH_MIN = 16


def _one_stream(messages: Sequence[OutMessage]) -> bool:
    # Weft's streams are told apart by the first two subject tokens (weft.steps, weft.results, ...).
    first = messages[0].subject.split(".", 2)[:2]
    return all(m.subject.split(".", 2)[:2] == first for m in messages)


# After the first message of a fetch, how long to wait for more to fill the batch.
_TOP_UP_WAIT = 0.0005

# logical stream -> (retention, max_age seconds or None for forever)
_RETENTION: dict[str, tuple[api.RetentionPolicy, float | None]] = {
    contract_subjects.STEPS_STREAM: (api.RetentionPolicy.WORK_QUEUE, None),
    contract_subjects.RESULTS_STREAM: (api.RetentionPolicy.WORK_QUEUE, None),
    contract_subjects.TRIGGERS_STREAM: (api.RetentionPolicy.LIMITS, TRIGGERS_MAX_AGE),
    contract_subjects.DLQ_STREAM: (api.RetentionPolicy.LIMITS, None),
}

# Lower case only: stream names carry it upper-cased, so "ab" and "AB" would share streams.
_NAMESPACE_RE = re.compile(r"[a-z0-9_-]{1,32}")
_ERR_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
_ERR_MSG_DELETE_FAILED = 10057
_ERR_SEQUENCE_NOT_FOUND = 10043
_ERR_MESSAGE_TOO_BIG = 10054  # over the stream's max_msg_size

# Errors after which the same call may well succeed: the broker is restarting,
# a leader election is running, the reply got lost in a reconnect.
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,  # nats.errors.TimeoutError derives from it
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    OSError,
)
_CLIENT_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, asyncio.TimeoutError, OSError)
# With no stream behind a subject, waiting rarely helps (ensure_streams was not
# run); retry only long enough to ride out a clustered leader election.
_NO_STREAM_RETRY_FOR = 5.0

T = TypeVar("T")


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, nats.errors.ConnectionClosedError)


@dataclass(slots=True, eq=False)
class NatsDelivery:
    """One delivered message. Ack, nak and term are fire-and-forget, like the server's ack protocol."""

    subject: str
    data: bytes
    headers: dict[str, str]
    msg_id: str | None
    delivered: int
    stream_seq: int
    _msg: Msg = field(repr=False)

    async def ack(self) -> None:
        await self._reply("ack", self._msg.ack())

    async def nak(self, delay: float | None = None) -> None:
        """Redeliver, after `delay` seconds when given (even when delay > ack_wait)."""
        if delay is not None and delay <= 0:
            delay = None
        await self._reply("nak", self._msg.nak(delay=delay))

    async def in_progress(self) -> None:
        """Reset the ack_wait timer: the work is still going on."""
        await self._reply("in_progress", self._msg.in_progress())

    async def term(self) -> None:
        """Never redeliver (the message stays in a limits stream, and is removed from a work queue)."""
        await self._reply("term", self._msg.term())

    async def _reply(self, operation: str, call: Awaitable[None]) -> None:
        try:
            await call
        except nats.errors.MsgAlreadyAckdError:
            # A second terminal reply is a no-op: the server would ignore it too.
            return
        except _CLIENT_ERRORS as exc:
            raise BrokerError(
                f"{operation} failed",
                operation=operation,
                subject=self.subject,
                retryable=_is_transient(exc),
            ) from exc


class NatsConsumer:
    """A durable pull consumer bound by one subscription; fetches are serialised per object."""

    def __init__(self, transport: NatsTransport, sub: JetStreamContext.PullSubscription, stream: str, durable: str):
        self._transport = transport
        self._sub = sub
        self.stream = stream
        self.durable = durable
        self._lock = asyncio.Lock()
        self._closed = False
        self._generation = transport._generation  # which client `_sub` belongs to
        # Messages of the durable delivered and not yet acked when we bound to it: left by a
        # process that died, maybe (services.broker.redelivery), or in flight in another.
        self.unacked_at_start = 0

    async def fetch(self, max_messages: int, timeout: float) -> list[NatsDelivery]:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        if self._closed:
            raise BrokerError("consumer is closed", operation="fetch", stream=self.stream)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(float(timeout), 0.0)
        transport = self._transport
        async with self._lock:
            # While disconnected, pull requests would only pile up in the
            # client's buffer and all fire at once on reconnect.
            if not await transport._wait_connected(deadline):
                return []
            if self._generation != transport._generation:
                await self._rebind()
            remaining = deadline - loop.time()
            if remaining < 0.01:
                remaining = 0.01
            try:
                # nats-py's fetch(batch=N) lingers until N messages arrived or the
                # timeout passed, holding what it already has. Instead: wait for the
                # first message, then take what is there at once (a short probe).
                msgs = await self._sub.fetch(1, timeout=remaining)
                if max_messages > 1:
                    try:
                        msgs += await self._sub.fetch(max_messages - 1, timeout=_TOP_UP_WAIT)
                    except asyncio.TimeoutError:
                        pass
            except asyncio.TimeoutError:  # also FetchTimeoutError and nats.errors.TimeoutError
                return []
            except _CLIENT_ERRORS as exc:
                raise BrokerError(
                    "fetch failed",
                    operation="fetch",
                    stream=self.stream,
                    retryable=_is_transient(exc),
                ) from exc
        return [transport._delivery(m) for m in msgs]

    async def _rebind(self) -> None:
        """The transport has a new client (the server closed the old one): bind to the durable through it."""
        generation = self._transport._generation
        try:
            self._sub = await self._transport._js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        except _CLIENT_ERRORS as exc:
            raise BrokerError("cannot bind consumer again", operation="fetch", stream=self.stream,
                              retryable=True) from exc
        self._generation = generation

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport._consumers.discard(self)
        if self._transport._nc.is_closed:
            return
        try:
            await self._sub.unsubscribe()
        except _CLIENT_ERRORS as exc:
            log.debug("unsubscribe of consumer %s/%s failed: %s", self.stream, self.durable, exc)


@dataclass(slots=True, frozen=True)
class StoredMessage:
    """A message read from a stream by its sequence (`NatsTransport.get_message`)."""

    subject: str  # logical subject (namespace stripped)
    data: bytes
    headers: dict[str, str]  # the publisher's headers; the dedup id is in msg_id, not here
    msg_id: str | None
    stream_seq: int


class NatsTransport:
    """The broker port on NATS JetStream. Build it with `await NatsTransport.connect(url)`."""

    def __init__(
        self,
        nc: NATS,
        *,
        namespace: str = "",
        request_timeout: float = 5.0,
        publish_retry_for: float = 30.0,
        publish_window: int = 512,
        replicas: int = 1,
        atomic: bool = True,
    ) -> None:
        _check_namespace(namespace)
        if publish_window < 1:
            raise ValueError("publish_window must be >= 1")
        self._nc = nc
        self._closing = False  # close() was called: a closed client is not to be replaced
        self._generation = 0  # bumped each time a new client replaces one the server closed
        self._reopening: asyncio.Task[None] | None = None
        if isinstance(nc, Client):
            nc.on_closed = self._on_closed
        self.namespace = namespace
        self._prefix = f"{namespace}." if namespace else ""
        self._suffix = f"_{namespace.upper()}" if namespace else ""
        self._request_timeout = request_timeout
        self._publish_retry_for = publish_retry_for
        self._publish_window = publish_window
        self._replicas = replicas
        self._atomic = atomic  # atomic batches in publish_many (nats-server >= 2.12)
        self._js: JetStreamContext = self._jetstream(nc)
        self._consumers: set[NatsConsumer] = set()
        # Where an oversized dead letter's full bytes go (services.broker.oversize); set by the wiring.
        self.blob_sink: BlobSink | None = None

    def _jetstream(self, nc: NATS) -> JetStreamContext:
        # The context's own pending cap only guards against misuse: the window
        # in publish_many is what bounds the in-flight count.
        return nc.jetstream(timeout=self._request_timeout,
                            publish_async_max_pending=max(4 * self._publish_window, 4000))

    # ---- construction -------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str | Sequence[str],
        *,
        namespace: str = "",
        name: str = "weft",
        connect_timeout: float = 10.0,
        request_timeout: float = 5.0,
        publish_retry_for: float = 30.0,
        publish_window: int = 512,
        replicas: int = 1,
        user: str | None = None,
        password: str | None = None,
    ) -> NatsTransport:
        """Connect, retrying for up to connect_timeout; afterwards the client reconnects forever.

        With `user` and `password` (services/broker/nats_auth.py), replies come to that role's own
        inbox prefix, the only one its broker permissions let it subscribe to."""
        _check_namespace(namespace)
        # A cluster is given as its seed URLs, comma-separated (WEFT_NATS_URL=nats://a,nats://b,...);
        # the client learns the rest of the cluster from the servers and follows it.
        servers = [u.strip() for u in url.split(",") if u.strip()] if isinstance(url, str) else list(url)
        nc = Client()
        refused: list[str] = []  # the server said no to the credentials: waiting will not help

        async def error_cb(exc: Exception) -> None:
            if "authorization violation" in str(exc).lower():
                refused.append(str(exc))
            # Connection errors are expected while the broker restarts.
            level = logging.DEBUG if _is_transient(exc) else logging.WARNING
            log.log(level, "nats client error: %s: %s", type(exc).__name__, exc)

        made: list[NatsTransport] = []  # the callbacks also serve the clients that replace this one

        async def disconnected_cb() -> None:
            client = made[0]._nc if made else nc
            if not client.is_closed:  # closing on purpose is not news
                log.warning("nats: disconnected from %s", ", ".join(servers))

        async def reconnected_cb() -> None:
            client = made[0]._nc if made else nc
            log.warning("nats: reconnected to %s", client.connected_url.netloc if client.connected_url else "?")

        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=servers,
                    name=name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,  # forever: a broker restart must heal by itself
                    reconnect_time_wait=0.5,
                    connect_timeout=min(2.0, connect_timeout),  # type: ignore[arg-type]
                    ping_interval=10,  # notice a dead peer within ~30 s
                    max_outstanding_pings=3,
                    error_cb=error_cb,
                    disconnected_cb=disconnected_cb,
                    reconnected_cb=reconnected_cb,
                    **_credentials(user, password),
                ),
                timeout=connect_timeout,
            )
        except (asyncio.TimeoutError, nats.errors.Error, OSError) as exc:
            try:
                await nc.close()
            except Exception:  # noqa: BLE001 - the connect error is the one worth reporting
                pass
            # A connect refused by the server (bad credentials) leaves its socket open in nats-py.
            if getattr(nc, "_transport", None) is not None:
                nc._transport.close()
            if refused and not nc.is_connected:
                who = f"user {user!r}" if user else "no credentials (the server requires them: WEFT_NATS_USER)"
                raise BrokerError(f"NATS at {', '.join(servers)} refused {who}: authorization violation",
                                  operation="connect", retryable=False) from exc
            raise BrokerError(
                f"cannot connect to NATS at {', '.join(servers)} within {connect_timeout:g}s",
                operation="connect",
                retryable=True,
            ) from exc
        made.append(cls(
            nc,
            namespace=namespace,
            request_timeout=request_timeout,
            publish_retry_for=publish_retry_for,
            publish_window=publish_window,
            replicas=replicas,
        ))
        return made[0]

    async def __aenter__(self) -> NatsTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- names ----------------------------------------------------------

    def stream_name(self, logical: str) -> str:
        return f"{logical}{self._suffix}"

    def subject(self, logical: str) -> str:
        return f"{self._prefix}{logical}"

    def logical_subject(self, physical: str) -> str:
        if self._prefix and physical.startswith(self._prefix):
            return physical[len(self._prefix) :]
        return physical

    @property
    def is_connected(self) -> bool:
        if self._nc.is_closed:  # asked by /readyz: a transport nobody uses must come back too
            try:
                self._reopen_if_closed()
            except RuntimeError:  # no event loop running here
                pass
        return self._nc.is_connected

    # ---- streams ----------------------------------------------------------

    def _stream_config(self, logical: str, captured: Sequence[str]) -> api.StreamConfig:
        retention, max_age = _RETENTION.get(logical, (api.RetentionPolicy.LIMITS, None))
        return api.StreamConfig(
            name=self.stream_name(logical),
            description=f"weft {logical}" + (f" (namespace {self.namespace})" if self.namespace else ""),
            subjects=[self.subject(s) for s in captured],
            retention=retention,
            storage=api.StorageType.FILE,
            max_age=max_age,
            duplicate_window=DUPLICATE_WINDOW,
            num_replicas=self._replicas,
            discard=api.DiscardPolicy.OLD,
            allow_atomic=True,  # publish_many writes a batch as one atomic (one-fsync) write
        )

    async def ensure_streams(self) -> None:
        for logical, captured in contract_subjects.STREAMS.items():
            await self.ensure_stream(self._stream_config(logical, captured))

    async def ensure_stream(self, config: api.StreamConfig) -> None:
        """Create the stream of `config`, or bring the existing one to it. Idempotent.

        For a stream beyond contracts.subjects.STREAMS (ensure_streams makes those):
        the names in `config` are physical, so build its name with stream_name()."""
        try:
            await self._retrying("add_stream", "", lambda _t: self._js.add_stream(config), stream=config.name)
        except BrokerError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, nats.js.errors.APIError) and cause.err_code == _ERR_STREAM_NAME_IN_USE):
                raise
            await self._retrying("update_stream", "", lambda _t: self._js.update_stream(config), stream=config.name)

    # ---- stored messages, by sequence -------------------------------------

    async def get_message(self, stream: str, seq: int) -> StoredMessage | None:
        """The message at sequence `seq` of `stream` (a logical name), delivered or not;
        None when the stream holds none there (deleted, or acked off a work queue)."""
        if seq < 1:
            raise ValueError("seq must be >= 1")
        physical = self.stream_name(stream)

        async def get(_timeout: float) -> Any:
            try:
                return await self._js.get_msg(physical, seq=seq)
            except nats.js.errors.NotFoundError:
                return None

        raw = await self._retrying("get_message", "", get, stream=physical)
        if raw is None:
            return None
        headers = dict(raw.headers) if raw.headers else {}
        msg_id = headers.pop(MSG_ID_HEADER, None)
        return StoredMessage(
            subject=self.logical_subject(raw.subject or ""), data=raw.data or b"", headers=headers, msg_id=msg_id,
            stream_seq=seq,
        )

    async def delete_message(self, stream: str, seq: int) -> bool:
        """Remove the message at sequence `seq` from `stream` (a logical name), so no consumer
        gets it again. False when it was not there (already deleted, or acked off a work queue)."""
        physical = self.stream_name(stream)

        async def delete(_timeout: float) -> bool:
            try:
                return bool(await self._js.delete_msg(physical, seq))
            except nats.js.errors.APIError as exc:
                if _no_such_message(exc):
                    return False
                raise

        return await self._retrying("delete_message", "", delete, stream=physical)

    # ---- publishing -----------------------------------------------------

    def _headers(self, message: OutMessage) -> dict[str, str] | None:
        if not message.headers and not message.msg_id:
            return None
        headers = dict(message.headers) if message.headers else {}
        if message.msg_id:
            headers[MSG_ID_HEADER] = message.msg_id
        return headers

    async def publish(self, message: OutMessage) -> bool:
        subject = self.subject(message.subject)
        headers = self._headers(message)
        self._check_size(message, headers)
        ack = await self._retrying(
            "publish",
            message.subject,
            lambda timeout: self._js.publish(subject, message.data, timeout=timeout, headers=headers),
        )
        return not ack.duplicate

    async def publish_many(self, messages: Sequence[OutMessage]) -> None:
        """Publish many messages, returning when all are stored.

        Messages bound for one stream go as JetStream atomic batches: the server
        stores a batch in one write, which with `sync_interval: always` is one
        fsync instead of one per message (several times the throughput). An
        atomic batch is refused whole if it holds a message id the stream has
        already seen (a relay republishing after a crash, say); such a batch,
        or one that fails for any other reason, is sent again message by
        message, where the broker drops each duplicate on its own.
        """
        if not messages:
            return
        for message in messages:  # one too large fails the call before any is sent
            self._check_size(message, self._headers(message), operation="publish_many")
        if len(messages) >= ATOMIC_BATCH_MIN and self._atomic and _one_stream(messages):
            for start in range(0, len(messages), ATOMIC_BATCH_MAX):
                chunk = messages[start : start + ATOMIC_BATCH_MAX]
                if len(chunk) < ATOMIC_BATCH_MIN:
                    await self._publish_pipelined(chunk)
                    continue
                try:
                    await self._publish_atomic(chunk)
                    continue
                except (BrokerError, asyncio.TimeoutError, *_CLIENT_ERRORS) as exc:
                    log.debug("atomic batch of %d not stored (%s): sending one by one", len(chunk), exc)
                await self._publish_pipelined(chunk)
            return
        await self._publish_pipelined(messages)

    async def _publish_atomic(self, messages: Sequence[OutMessage]) -> None:
        batch_id = uuid.uuid4().hex
        last = len(messages)
        batch: list[tuple[OutMessage, dict[str, str]]] = []
        for i, message in enumerate(messages, 1):
            headers = self._headers(message) or {}
            headers["Nats-Batch-Id"] = batch_id
            headers["Nats-Batch-Sequence"] = str(i)
            if i == last:
                headers["Nats-Batch-Commit"] = "1"
            # The batch headers may tip one over: then nothing of the batch is sent (it goes one by one).
            self._check_size(message, headers, operation="publish_many")
            batch.append((message, headers))
        for i, (message, headers) in enumerate(batch, 1):
            subject = self.subject(message.subject)
            if i < last:
                await self._nc.publish(subject, message.data, headers=headers)
                continue
            reply = await self._nc.request(subject, message.data, headers=headers, timeout=self._request_timeout)
            ack = json.loads(reply.data or b"{}")
            if "error" in ack or ack.get("count") != last:
                error = ack.get("error") or {}
                raise BrokerError(
                    f"atomic batch refused: {error.get('description') or ack}", operation="publish_many",
                    subject=message.subject, retryable=False,
                )

    async def _publish_pipelined(self, messages: Sequence[OutMessage]) -> None:
        """Pipelined publish; messages that failed transiently are resent (same msg id) until the deadline.

        Without msg ids a resend may store a message twice (at-least-once).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._publish_retry_for
        todo = list(range(len(messages)))
        delay = 0.05
        while True:
            failures = await self._pipeline(messages, todo)
            if not failures:
                return
            fatal = [(i, e) for i, e in failures if not self._transient(e)]
            if fatal or loop.time() + delay >= deadline:
                index, exc = (fatal or failures)[0]
                if isinstance(exc, nats.js.errors.APIError) and exc.err_code == _ERR_MESSAGE_TOO_BIG:
                    raise MessageRejected(f"publish refused: {exc.description}", operation="publish_many",
                                          subject=messages[index].subject) from exc
                raise BrokerError(
                    f"{len(failures)} of {len(messages)} messages were not stored "
                    f"(first: #{index}, {type(exc).__name__})",
                    operation="publish_many",
                    subject=messages[index].subject,
                    retryable=not fatal,
                ) from exc
            self._reopen_if_closed()
            todo = sorted(i for i, _ in failures)
            log.info("publish_many: resending %d unacked messages", len(todo))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _pipeline(self, messages: Sequence[OutMessage], indexes: list[int]) -> list[tuple[int, BaseException]]:
        loop = asyncio.get_running_loop()
        window = asyncio.Semaphore(self._publish_window)
        inflight: list[tuple[int, asyncio.Future[Any]]] = []
        failures: list[tuple[int, BaseException]] = []
        timeout = self._request_timeout
        for index in indexes:
            message = messages[index]
            # Every slot is given back by an ack, an error, or the ack timer below.
            await window.acquire()
            try:
                # wait_stall=None: the context's own cap is larger than the window,
                # so this never waits, and without a timeout it does not yield to
                # the loop either: the flusher then writes many messages per send.
                future = await self._js.publish_async(
                    self.subject(message.subject),
                    message.data,
                    headers=self._headers(message),
                    wait_stall=None,
                )
            except _CLIENT_ERRORS as exc:
                window.release()
                failures.append((index, exc))
                continue
            # nats-py's ack futures never time out by themselves: an ack lost in
            # a reconnect would hold its slot forever.
            timer = loop.call_later(timeout, future.cancel)

            def _done(_f: asyncio.Future[Any], timer: asyncio.TimerHandle = timer) -> None:
                timer.cancel()
                window.release()

            future.add_done_callback(_done)
            inflight.append((index, future))
        if inflight:
            await asyncio.wait([f for _, f in inflight])
        for index, future in inflight:
            if future.cancelled():
                failures.append((index, asyncio.TimeoutError(f"no ack within {timeout:g}s")))
            elif (exc := future.exception()) is not None:
                failures.append((index, exc))
        return failures

    # ---- consuming --------------------------------------------------------

    async def consumer(
        self,
        stream: str,
        durable: str,
        *,
        filter_subject: str | None = None,
        ack_wait: float = 30.0,
        max_deliver: int = 10,
        max_ack_pending: int = 1000,
    ) -> NatsConsumer:
        """Create or update the durable, then bind to it. Processes sharing a durable share its messages."""
        physical = self.stream_name(stream)
        config = api.ConsumerConfig(
            name=durable,
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max_ack_pending,
            filter_subject=self.subject(filter_subject) if filter_subject else None,
        )
        # Without an explicit action the server creates or updates, so binding to
        # a durable another process made is the same call as making it.
        info = await self._retrying(
            "add_consumer", filter_subject or "", lambda _t: self._js.add_consumer(physical, config), stream=physical
        )
        try:
            sub = await self._js.pull_subscribe_bind(durable=durable, stream=physical)
        except _CLIENT_ERRORS as exc:
            raise BrokerError(
                "cannot bind consumer", operation="consumer", stream=physical, retryable=_is_transient(exc)
            ) from exc
        consumer = NatsConsumer(self, sub, physical, durable)
        consumer._generation = self._generation
        consumer.unacked_at_start = int(getattr(info, "num_ack_pending", 0) or 0)
        self._consumers.add(consumer)
        return consumer

    def _delivery(self, msg: Msg) -> NatsDelivery:
        meta = msg.metadata
        headers = dict(msg.headers) if msg.headers else {}
        msg_id = headers.pop(MSG_ID_HEADER, None)
        return NatsDelivery(
            subject=self.logical_subject(msg.subject),
            data=msg.data,
            headers=headers,
            msg_id=msg_id,
            delivered=meta.num_delivered,
            stream_seq=meta.sequence.stream,
            _msg=msg,
        )

    # ---- dead letters -----------------------------------------------------

    async def dead_letter(
        self,
        kind: str,
        payload: bytes,
        *,
        reason: str,
        headers: Mapping[str, str] | None = None,
        source_subject: str = "",
        delivered: int = 0,
        msg_id: str | None = None,
    ) -> None:
        """Store a dead letter. Pass the source message's identity (contracts.deadletters.message_key,
        or another stable id) as msg_id: it is the dead letter's dedup id, else one is derived from
        kind, source subject and payload."""
        [letter] = await fit([DeadLetter(
            kind, payload, reason, headers=headers, source_subject=source_subject, delivered=delivered, msg_id=msg_id,
        )], self.blob_sink)
        await self.publish(self._dead_letter_message(letter))

    async def dead_letter_many(self, letters: Sequence[DeadLetter]) -> None:
        """Store many dead letters in one atomic batch (one stored write); a batch holding one the
        stream has seen already (a redelivered poison message) goes message by message instead,
        and the broker drops that one as a duplicate."""
        fitted = await fit(letters, self.blob_sink)
        await self.publish_many([self._dead_letter_message(letter) for letter in fitted])

    @staticmethod
    def _dead_letter_message(letter: DeadLetter) -> OutMessage:
        # Nats-* headers are the server's (an Nats-Expected-Stream copied over would be rejected).
        out = {k: v for k, v in (letter.headers or {}).items() if not k.lower().startswith("nats-")}
        out[DLQ_REASON_HEADER] = letter.reason[:_DLQ_REASON_MAX]
        out[DLQ_SOURCE_SUBJECT_HEADER] = letter.source_subject
        out[DLQ_DELIVERED_HEADER] = str(letter.delivered)
        out[DLQ_KIND_HEADER] = letter.kind
        if letter.msg_id:
            # The source message's identity is the dedup id as it is: whoever dead-letters that
            # message again (its redelivery, the MaxDeliver capture) stores nothing new.
            out[DLQ_MSG_ID_HEADER] = dedup = letter.msg_id
        else:
            digest = hashlib.sha256(letter.source_subject.encode() + b"\0" + letter.payload).hexdigest()[:32]
            dedup = f"dlq:{letter.kind}:sha256:{digest}"
        return OutMessage(subject=contract_subjects.dlq_subject(letter.kind), data=letter.payload, msg_id=dedup, headers=out)

    # ---- observing (services/telemetry/metrics.py) ---------------------------

    async def backlog(self, stream: str, durable: str) -> int:
        """Messages the durable has not acked yet: waiting to be delivered, or delivered and unacked."""
        info = await self._js.consumer_info(self.stream_name(stream), durable, timeout=2.0)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    # ---- lifecycle --------------------------------------------------------

    async def close(self) -> None:
        self._closing = True
        if self._reopening is not None:
            self._reopening.cancel()
        if self._nc.is_closed:
            return
        for consumer in list(self._consumers):
            await consumer.close()
        if self._nc.is_connected:
            try:
                # Acks are fire-and-forget: make sure they left before we hang up.
                await self._nc.flush(timeout=2)
            except _CLIENT_ERRORS as exc:
                log.debug("flush before close failed: %s", exc)
        await self._nc.close()

    # ---- helpers ----------------------------------------------------------

    def _check_size(self, message: OutMessage, headers: dict[str, str] | None, operation: str = "publish") -> None:
        """PayloadTooLarge unless the server takes `message` (with `headers`): it would close the connection."""
        size = wire_size(message.data, headers)
        limit = self._nc.max_payload
        if size > limit:
            raise PayloadTooLarge(size, limit, operation=operation, subject=message.subject)

    def _transient(self, exc: BaseException) -> bool:
        # A client the server closed is being replaced (_reopen): waiting helps, unless we closed it.
        if isinstance(exc, nats.errors.ConnectionClosedError):
            return not self._closing
        return _is_transient(exc)

    async def _on_closed(self) -> None:
        self._reopen_if_closed()

    def _reopen_if_closed(self) -> None:
        """Start connecting a new client if the server closed ours. Called from the client's closed
        callback and, because nats-py skips that callback when the close comes while it is
        (re)connecting, from every wait for the connection too."""
        if self._closing or not self._nc.is_closed:
            return
        if self._reopening is not None and not self._reopening.done():
            return
        why = self._nc.last_error
        log.warning("nats: the client was closed (%s: %s); connecting a new one",
                    type(why).__name__ if why else "no error", why)
        self._reopening = asyncio.ensure_future(self._reopen())

    async def _reopen(self) -> None:
        """Connect a new client as the closed one was, until that works or close() is called.
        Consumers bind to their durables again on their next fetch."""
        old = self._nc
        assert isinstance(old, Client)
        delay, failures = 0.5, 0
        while not self._closing:
            try:
                new = await asyncio.wait_for(old.twin(), timeout=10.0)
            except (asyncio.TimeoutError, nats.errors.Error, OSError) as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:  # one line now and then, not one per try
                    log.warning("nats: a new client could not connect (%d tries so far): %s: %s",
                                failures, type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closing:
                await new.close()
                return
            new.on_closed = self._on_closed
            self._nc, self._js = new, self._jetstream(new)
            self._generation += 1
            log.warning("nats: connected again with a new client")
            return

    async def _wait_connected(self, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        while not self._nc.is_connected:  # reconnecting, or a new client on its way (_reopen)
            if self._closing:
                raise BrokerError("connection is closed", operation="fetch")
            self._reopen_if_closed()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(0.05, remaining))
        return True

    async def _retrying(
        self,
        operation: str,
        subject: str,
        call: Callable[[float], Awaitable[T]],
        *,
        stream: str = "",
    ) -> T:
        """Run call(timeout), retrying transient failures with backoff until publish_retry_for is used up."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self._publish_retry_for
        delay = 0.05
        while True:
            if self._closing:
                raise BrokerError("connection is closed", operation=operation, subject=subject, stream=stream)
            self._reopen_if_closed()
            remaining = deadline - loop.time()
            try:
                return await call(max(0.1, min(self._request_timeout, remaining)))
            except _CLIENT_ERRORS as exc:
                limit = deadline
                if isinstance(exc, (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError)):
                    limit = min(deadline, start + _NO_STREAM_RETRY_FOR)
                if isinstance(exc, nats.js.errors.APIError) and exc.err_code == _ERR_MESSAGE_TOO_BIG:
                    raise MessageRejected(f"{operation} refused: {exc.description}", operation=operation,
                                          subject=subject, stream=stream) from exc
                transient = self._transient(exc)
                if not transient or loop.time() + delay >= limit:
                    raise BrokerError(
                        _describe(operation, exc),
                        operation=operation,
                        subject=subject,
                        stream=stream,
                        retryable=transient,
                    ) from exc
                log.debug("%s failed (%s), retrying in %.2fs", operation, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def _credentials(user: str | None, password: str | None) -> dict[str, Any]:
    if not user:
        return {}
    from services.broker.nats_auth import inbox_prefix

    return {"user": user, "password": password or "", "inbox_prefix": inbox_prefix(user)}


def _no_such_message(exc: nats.js.errors.APIError) -> bool:
    # STREAM.MSG.DELETE of a missing sequence: 10057 "no message found" (or 10043, or a 404).
    if isinstance(exc, nats.js.errors.NotFoundError) or exc.err_code == _ERR_SEQUENCE_NOT_FOUND:
        return True
    return exc.err_code == _ERR_MSG_DELETE_FAILED and "no message found" in (exc.description or "")


def _describe(operation: str, exc: BaseException) -> str:
    if isinstance(exc, (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError)):
        return f"{operation} failed: no stream captures this subject (has ensure_streams() run?)"
    if isinstance(exc, asyncio.TimeoutError):
        return f"{operation} timed out"
    return f"{operation} failed"


def _check_namespace(namespace: str) -> None:
    if namespace and not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(f"namespace must match {_NAMESPACE_RE.pattern!r}, got {namespace!r}")
