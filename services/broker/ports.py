"""The broker port: what Weft's services need from a message broker, and nothing more.

Callers always speak in logical names (the streams and subjects of
`contracts.subjects`); an adapter may map them onto physical names (the NATS
adapter's namespaces do). Delivery is at-least-once everywhere: a message that
is not acked in time, or is nak'ed, comes back with `delivered` incremented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    subject: str
    data: bytes
    msg_id: str | None = None  # deduplication id (Nats-Msg-Id); same id within the window = one message
    headers: Mapping[str, str] | None = None


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
    subject: str  # logical subject (namespace stripped)
    data: bytes
    headers: dict[str, str]  # the publisher's headers; the dedup id is in msg_id, not here
    msg_id: str | None
    delivered: int  # delivery count, 1 on first delivery
    stream_seq: int

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def in_progress(self) -> None: ...

    async def term(self) -> None: ...


@runtime_checkable
class Consumer(Protocol):
    """A durable pull consumer. An adapter may also give it `unacked_at_start: int`, the messages
    of the durable delivered and not acked when it was bound (services.broker.redelivery reads it,
    and assumes some when it is missing)."""

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to max_messages deliveries; [] when none came within timeout (never raises on timeout)."""
        ...

    async def close(self) -> None:
        """Stop pulling. The durable stays on the broker; unacked messages are redelivered after ack_wait."""
        ...


class BrokerError(Exception):
    """Root error of the broker package.

    `retryable` says whether the same call may succeed later (broker down,
    timeout) or never will (bad configuration, a stream that does not exist).
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

    Raised before it is put on the wire: a NATS server closes the connection of
    a client that sends one."""

    def __init__(self, size: int, limit: int, *, operation: str = "publish", subject: str = "") -> None:
        super().__init__(
            f"message of {size} bytes is over the broker's limit of {limit} bytes",
            operation=operation, subject=subject,
        )
        self.size, self.limit = size, limit


@runtime_checkable
class Transport(Protocol):
    async def ensure_streams(self) -> None:
        """Create or update the streams of contracts.subjects.STREAMS. Idempotent."""
        ...

    async def publish(self, message: OutMessage) -> bool:
        """Wait for the stream's ack. False when the broker dropped it as a duplicate of msg_id."""
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
        """Create (or bind to) a durable pull consumer; several processes may share one durable."""
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
        """Store a dead letter on dlq_subject(kind). Idempotent for the same msg_id within the dedup window."""
        ...

    async def dead_letter_many(self, letters: Sequence[DeadLetter]) -> None:
        """Store many dead letters, as one write where the broker can; returns when all are stored,
        raises BrokerError if any was not. Idempotent per msg_id, like dead_letter()."""
        ...

    async def close(self) -> None: ...
