"""The event store port: records, errors and the Protocols the adapters implement.

Nothing here touches a database; `services.store.sqlite` and
`services.store.postgres` implement `EventStore` on top of the `eventsourcing`
library's process recorders.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from uuid import UUID

Dialect = Literal["sqlite", "postgresql"]
ConflictKind = Literal["version", "inbox", "tracking"]
# A notification log row as `ViewTransaction.read_log` gives it:
# (position, stream id as canonical UUID text, version, type, data).
LogRow = tuple[int, str, int, str, bytes]


@dataclass(slots=True, frozen=True)
class NewEvent:
    """An event to append: `(stream_id, version)` is unique in the store."""

    stream_id: UUID  # e.g. an execution id
    version: int  # 1-based position in its stream
    type: str  # event type name, e.g. "StepScheduled"
    data: bytes  # JSON (orjson) bytes


@dataclass(slots=True, frozen=True)
class StoredRecord:
    """An event as stored. `position` is its place in the global notification log
    (0 when read via `load()`, where it is not known)."""

    position: int
    stream_id: UUID
    version: int
    type: str
    data: bytes


class StoreError(Exception):
    """Root error of the store package. The database error, if any, is `__cause__`.

    Fields: `operation` (the store method, e.g. "append"), `backend`
    ("sqlite" | "postgresql" | ""), and `transient` (True when retrying the same
    call later may succeed: connection lost, database locked, pool exhausted).
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str = "",
        backend: str = "",
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.operation = operation
        self.backend = backend
        self.transient = transient

    def __reduce__(self) -> Any:  # keep fields when pickled (e.g. across processes)
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[StoreError], message: str, fields: dict[str, Any]) -> StoreError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(fields)
    return err


class ConcurrencyError(StoreError):
    """A `(stream_id, version)`, an inbox message id or a tracking position was
    already taken. Nothing of the batch was stored.

    `kind` says which: "version" (an event version exists, or appears twice in the
    batch), "inbox" (a message id was already recorded) or "tracking" (the tracked
    position is not greater than the recorded one). Best-effort details, computed
    after the failed transaction: `stream_ids` (streams of the batch whose
    versions collide), `message_ids` (inbox ids already seen), `tracking`.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: ConflictKind,
        operation: str = "append",
        backend: str = "",
        stream_ids: tuple[UUID, ...] = (),
        message_ids: tuple[str, ...] = (),
        tracking: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(message, operation=operation, backend=backend, transient=False)
        self.kind = kind
        self.stream_ids = stream_ids
        self.message_ids = message_ids
        self.tracking = tracking


class StoreUnavailableError(StoreError):
    """The database could not be reached or was busy (connection refused or lost,
    locked, pool timeout). `transient` is True. For `append`, the outcome may be
    unknown if the connection was lost during commit: retry the same append; if it
    had been stored, the retry raises `ConcurrencyError`."""

    def __init__(self, message: str, *, operation: str = "", backend: str = "") -> None:
        super().__init__(message, operation=operation, backend=backend, transient=True)


class StoreConfigError(StoreError, ValueError):
    """A store URL or option is invalid (unknown scheme, bad schema name...)."""


class ViewTransaction(Protocol):
    """One database transaction for projections: view rows and tracking together."""

    dialect: str  # "sqlite" | "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run SQL written with '?' placeholders (converted to %s for Postgres)."""

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def fetchall(self) -> list[tuple[Any, ...]]: ...

    def fetchone(self) -> tuple[Any, ...] | None: ...

    def track(self, name: str, position: int) -> None:
        """Record the follower's position in this transaction (must increase)."""

    def read_log(self, after: int, limit: int) -> list[LogRow]:
        """The notification log as this transaction sees it, for a follower that
        writes what it makes of a batch in the same transaction: every event with
        position > after, ascending, at most `limit`. Plain tuples with text stream
        ids (about half the decoding cost of `StoredRecord`s, for catch-ups of
        millions of events), and no type filter: the caller skips what it does not
        want (a filter in SQL makes PostgreSQL sort the rest of the log instead of
        walking its index)."""

    def head(self) -> int:
        """The maximum position as this transaction sees it, 0 if the store is empty."""

    def read_stream(self, stream_id: str, upto_version: int | None = None) -> list[LogRow]:
        """One stream's events as this transaction sees it, oldest first, up to a version:
        for a view whose row needs what came before an event in its stream (the dead-letter
        view reads the attempt's input and traceback). Same tuples as `read_log`."""


class EventStore(Protocol):
    """Append-only event store with a global notification log (the outbox)."""

    url: str
    dialect: str

    def append(
        self,
        events: Sequence[NewEvent],
        *,
        inbox: Sequence[str] = (),
        tracking: tuple[str, int] | None = None,
    ) -> list[int]:
        """One transaction: all events + inbox message ids + optional tracking
        record, or nothing. Returns the events' positions, in order. Raises
        ConcurrencyError on any conflict."""

    def load(
        self, stream_id: UUID, after_version: int = 0, upto_version: int | None = None
    ) -> list[StoredRecord]:
        """A stream's events with after_version < version <= upto_version, ascending."""

    def load_many(self, stream_ids: Sequence[UUID]) -> dict[UUID, list[StoredRecord]]:
        """Whole histories of many streams in one round trip (a batch's cache misses: the
        result consumer's hot path). Every id asked for is a key, with [] when the stream is
        empty; each list is ascending by version; an id asked twice is loaded once."""

    def read(self, after: int, limit: int, types: Sequence[str] = ()) -> list[StoredRecord]:
        """The notification log: position > after, ascending, at most `limit`."""

    def head(self) -> int:
        """The maximum position, 0 if the store is empty."""

    def follow(self, after: int, limit: int, types: Sequence[str]) -> tuple[list[StoredRecord], int]:
        """A poller's `read` of a few types: (the records, where to read from next). The next
        position is past the other types' events too: a follower of a rare type that polls
        would otherwise walk the same stretch of the log on every poll (a dead-letter flood
        after the last StepScheduled made the relay do that 50 times a second)."""

    def seen(self, message_ids: Sequence[str]) -> set[str]:
        """Which of these message ids are in the inbox."""

    def prune_inbox(self, older_than: float, *, batch: int = 10_000) -> int:
        """Forget inbox message ids recorded more than `older_than` seconds ago, `batch` to a
        transaction (the writer is never held long); returns how many were forgotten."""

    def position(self, name: str) -> int:
        """The tracked position of a follower (0 if none)."""

    def track(self, name: str, position: int) -> None:
        """Record a follower's position; ConcurrencyError unless it increases."""

    def transaction(self) -> AbstractContextManager[ViewTransaction]:
        """Commits on exit, rolls back on exception."""

    def reader(self) -> AbstractContextManager[ViewTransaction]:
        """A read-only transaction for queries of view tables: on SQLite it does not
        take the single writer (transaction() does), so reads never queue behind writes."""

    def close(self) -> None: ...
