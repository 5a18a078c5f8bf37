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
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
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
from services.broker.oversize import BlobSink
from services.broker.nats_delivery import NatsConsumer, NatsDelivery
from services.broker.nats_errors import (
    _CLIENT_ERRORS, _ERR_MESSAGE_TOO_BIG, _ERR_STREAM_NAME_IN_USE, _NO_STREAM_RETRY_FOR, _describe, _is_transient,
)
from services.broker.nats_publish import MSG_ID_HEADER, Publishing
from services.broker.nats_stored import StoredMessage, StoredMessages
from services.broker.ports import BrokerError, MessageRejected, OutMessage, PayloadTooLarge

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


DUPLICATE_WINDOW = 120.0
TRIGGERS_MAX_AGE = 7 * 24 * 3600.0

# logical stream -> (retention, max_age seconds or None for forever)
_RETENTION: dict[str, tuple[api.RetentionPolicy, float | None]] = {
    contract_subjects.STEPS_STREAM: (api.RetentionPolicy.WORK_QUEUE, None),
    contract_subjects.RESULTS_STREAM: (api.RetentionPolicy.WORK_QUEUE, None),
    contract_subjects.TRIGGERS_STREAM: (api.RetentionPolicy.LIMITS, TRIGGERS_MAX_AGE),
    contract_subjects.DLQ_STREAM: (api.RetentionPolicy.LIMITS, None),
}

# Lower case only: stream names carry it upper-cased, so "ab" and "AB" would share streams.
_NAMESPACE_RE = re.compile(r"[a-z0-9_-]{1,32}")
T = TypeVar("T")

T = TypeVar("T")


class NatsTransport(Publishing, StoredMessages):
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


def _check_namespace(namespace: str) -> None:
    if namespace and not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(f"namespace must match {_NAMESPACE_RE.pattern!r}, got {namespace!r}")
