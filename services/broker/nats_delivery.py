"""Deliveries and pull consumers of the NATS adapter (`NatsTransport.consumer`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats.errors
import orjson
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.broker.nats_errors import _CLIENT_ERRORS, _is_transient
from services.broker.ports import BrokerError

if TYPE_CHECKING:
    from services.broker.nats import NatsTransport

log = logging.getLogger("services.broker.nats")

# After the first message of a fetch, how long to wait for more to fill the batch (only with a
# nats-py whose pull subscription lacks what `_top_up` uses), and at most for the server's
# answer to a no-wait pull (it answers at once; this bounds a lost answer).
_TOP_UP_WAIT = 0.0005
_TOP_UP_REPLY = 1.0


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
                    msgs += await self._top_up(max_messages - 1)
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

    async def _top_up(self, most: int) -> list[Msg]:
        """What the server has for this consumer right now, at most `most`, without waiting for more.

        nats-py's fetch sends its first request with `expires`, and the server then treats
        `no_wait` as a lingering pull: a top-up with a short timeout cost that timeout (and
        a timer, late on a busy loop) on every fetch, i.e. twice per step. A `no_wait`
        request without `expires` is answered at once: the messages there are, then a 404.
        """
        sub: Any = self._sub
        inner, nms, deliver = getattr(sub, "_sub", None), getattr(sub, "_nms", None), getattr(sub, "_deliver", None)
        if inner is None or nms is None or deliver is None:  # a nats-py without these: its own fetch
            try:
                return list(await self._sub.fetch(most, timeout=_TOP_UP_WAIT))
            except asyncio.TimeoutError:
                return []
        await self._transport._nc.publish(nms, orjson.dumps({"batch": most, "no_wait": True}), deliver)
        msgs: list[Msg] = []
        while len(msgs) < most:
            try:
                msg = await inner.next_msg(timeout=_TOP_UP_REPLY)
            except asyncio.TimeoutError:
                break  # the answer is late (a reconnect?): the next fetch reads what comes
            status = JetStreamContext.is_status_msg(msg)
            if not status:
                msgs.append(msg)
            elif not JetStreamContext._is_heartbeat(status):
                break  # 404 no messages (or a 408 of an earlier pull): nothing more right now
        return msgs

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
