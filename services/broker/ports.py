"""The broker port: what Weft's services need from a message broker, and nothing more.

Callers always speak in logical names (the streams and subjects of
`contracts.subjects`); an adapter maps them onto whatever its broker calls
them. Delivery is at-least-once everywhere: a message that is not acked within
the consumer's ack wait, or is nak'ed, comes back with `delivered` incremented.
Duplicates are possible on every broker; what makes their effect happen once
is the receiver (the store's inbox, deterministic attempt ids), not the
broker, which at best drops some of them early.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "BrokerError",
    "Consumer",
    "MessageRejected",
    "PayloadTooLarge",
    "DeadLetter",
    "Delivery",
    "OutMessage",
    "Transport",
]


@dataclass(slots=True, frozen=True)
class OutMessage:
    """A message to publish."""

    subject: str  # logical subject (contracts.subjects); it decides the stream
    data: bytes
    # The message's dedup identity: the same id published again is the same message. A broker
    # may drop the copy early; receivers must treat a second one as a duplicate either way.
    msg_id: str | None = None
    headers: Mapping[str, str] | None = None
    # What orders messages: those with one key are delivered in publish order relative to each
    # other (the execution id, so that one execution's results queue together). None: any order.
    key: str | None = None


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """A message for the dead-letter stream: the source message's bytes and what is known about it."""

    kind: str  # one of contracts.deadletters.MESSAGE_KINDS
    payload: bytes
    reason: str
    headers: Mapping[str, str] | None = None  # the source message's own headers
    source_subject: str = ""
    delivered: int = 0
    msg_id: str | None = None  # the source message's identity (contracts.deadletters.message_key)

    @classmethod
    def of(cls, msg: Delivery, kind: str, reason: str, msg_id: str,
           headers: Mapping[str, str] | None = None) -> DeadLetter:
        """The dead letter of a delivered message, with `headers` added to its own."""
        return cls(kind, msg.data, reason, headers={**msg.headers, **(headers or {})}, source_subject=msg.subject,
                   delivered=msg.delivered, msg_id=msg_id)


@runtime_checkable
class Delivery(Protocol):
    """One delivery of a message to a consumer. Settle it exactly once with ack, nak or term;
    a second settling is a no-op."""

    subject: str  # logical subject
    data: bytes
    headers: dict[str, str]  # the publisher's headers; the dedup identity is in msg_id, not here
    msg_id: str | None  # the publisher's dedup identity (OutMessage.msg_id)
    delivered: int  # how often this message was handed out, 1 the first time
    stream_seq: int  # >= 1, unique within its stream: names the message (contracts.deadletters.message_key)

    async def ack(self) -> None:
        """Done: never deliver it again. Call it only after its effect is durable."""
        ...

    async def nak(self, delay: float | None = None) -> None:
        """Not done: deliver it again, after `delay` seconds when given (the broker is the timer)."""
        ...

    async def in_progress(self) -> None:
        """Still working: restart this delivery's ack wait, so a long step is not handed to another."""
        ...

    async def term(self) -> None:
        """Never deliver it again, without it being done (it was dead-lettered, say)."""
        ...


@runtime_checkable
class Consumer(Protocol):
    """A durable consumer of one stream, named by its durable name: processes that share the name
    share the messages, and a message is done for it once acked by any of them. A delivery not
    settled within `ack_wait` (and not kept alive by in_progress) is handed out again, to this or
    another process; after `max_deliver` deliveries it is dead-lettered (kind `max_deliver`) and not
    handed out again. One slow message never holds back the others.

    An adapter may also give it `unacked_at_start: int`, the messages of the durable delivered and
    not acked when it was bound (services.broker.redelivery reads it, and assumes some when it is
    missing)."""

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to max_messages deliveries; [] when none came within timeout (never raises on timeout)."""
        ...

    async def close(self) -> None:
        """Stop consuming. The durable's position stays on the broker; what was delivered and not
        acked is delivered again (to whoever consumes the durable next)."""
        ...


class BrokerError(Exception):
    """Root error of the broker package.

    `retryable` says whether the same call may succeed later (broker down,
    timeout) or never will (bad configuration, a stream that does not exist).
    `stream` names the broker's own name for the stream (queue, topic) involved.
    The underlying client error is chained as `__cause__`.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str = "",
        subject: str = "",
        stream: str = "",
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.operation = operation
        self.subject = subject
        self.stream = stream
        self.retryable = retryable

    def __str__(self) -> str:
        parts = [self.message]
        if self.operation:
            parts.append(f"operation={self.operation}")
        if self.stream:
            parts.append(f"stream={self.stream}")
        if self.subject:
            parts.append(f"subject={self.subject}")
        cause = self.__cause__
        if cause is not None:
            parts.append(f"cause={type(cause).__name__}: {cause}")
        return " ".join(parts)


class MessageRejected(BrokerError):
    """This one message can never be stored, however often it is sent again (too large, say).

    Unlike other non-retryable errors it says nothing about the broker or the
    connection: a publisher may give up on this message and go on with the next."""

    def __init__(self, message: str, **kw: object) -> None:
        kw.setdefault("retryable", False)
        super().__init__(message, **kw)  # type: ignore[arg-type]


class PayloadTooLarge(MessageRejected):
    """A message larger than the broker accepts (headers and body together).

    Raised before it is put on the wire: a broker may close the connection of a
    client that sends one, or reject the whole batch it came in."""

    def __init__(self, size: int, limit: int, *, operation: str = "publish", subject: str = "") -> None:
        super().__init__(
            f"message of {size} bytes is over the broker's limit of {limit} bytes",
            operation=operation, subject=subject,
        )
        self.size, self.limit = size, limit


@runtime_checkable
class Transport(Protocol):
    """What the services need from a broker: publish commands, results, triggers and dead
    letters; consume them with ack, nak and in-progress. Dead letters are read back through an
    ordinary consumer of contracts.subjects.DLQ_STREAM."""

    # Where a dead letter too big for the broker leaves its payload (stores bytes, returns their
    # SHA-256); the stack sets it to the event store's blob store. None: such letters are cut.
    blob_sink: Callable[[bytes], str] | None

    async def ensure_streams(self) -> None:
        """Create or update the streams of contracts.subjects.STREAMS. Idempotent."""
        ...

    async def publish(self, message: OutMessage) -> bool:
        """Return once the broker stored it durably. False when the broker recognised it as a
        duplicate of a recent msg_id and dropped it (not every duplicate is recognised)."""
        ...

    async def publish_many(self, messages: Sequence[OutMessage]) -> None:
        """Publish with many in flight; returns when all are acked, raises BrokerError if any failed."""
        ...

    async def consumer(
        self,
        stream: str,
        durable: str,
        *,
        filter_subject: str | None = None,
        ack_wait: float = 30.0,
        max_deliver: int = 10,
        max_ack_pending: int = 1000,
    ) -> Consumer:
        """Create (or bind to) the durable consumer `durable` of `stream`, only the messages whose
        subject matches `filter_subject` (a trailing `.>` matches any rest) when given. max_deliver
        -1 is never give up; max_ack_pending bounds the deliveries out and not settled."""
        ...

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
        """Store a dead letter on dlq_subject(kind). msg_id is the source message's identity
        (contracts.deadletters.message_key); storing it again is a duplicate the ingester drops."""
        ...

    async def dead_letter_many(self, letters: Sequence[DeadLetter]) -> None:
        """Store many dead letters, as one write where the broker can; returns when all are stored,
        raises BrokerError if any was not. Idempotent per msg_id, like dead_letter()."""
        ...

    async def close(self) -> None: ...
