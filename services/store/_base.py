"""Shared implementation of `EventStore` over an eventsourcing process recorder.

The backends (sqlite.py, postgres.py) provide the recorder subclass (extra
tables written in the recorder's own insert transaction), a view transaction,
and two small queries; everything else is here.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Protocol, TypeVar
from uuid import UUID

import psycopg
from eventsourcing import persistence as es
from eventsourcing.persistence import StoredEvent, Tracking

from services.store.ports import (
    ConcurrencyError,
    ConflictKind,
    LogRow,
    NewEvent,
    StoredRecord,
    StoreError,
    StoreUnavailableError,
    ViewTransaction,
)

T = TypeVar("T")

_TRANSIENT: tuple[type[BaseException], ...] = (
    es.OperationalError,
    es.InterfaceError,
    sqlite3.OperationalError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    TimeoutError,
)


def map_error(exc: BaseException, operation: str, backend: str) -> StoreError:
    """Wrap a database (or eventsourcing) error; the caller raises it `from exc`."""
    if isinstance(exc, StoreError):
        return exc
    text = f"{operation} failed: {type(exc).__name__}: {exc}".strip()
    if isinstance(exc, es.ConnectionPoolClosedError):
        msg = f"{operation} failed: the store is closed"
        return StoreError(msg, operation=operation, backend=backend)
    if isinstance(exc, _TRANSIENT):
        return StoreUnavailableError(text, operation=operation, backend=backend)
    return StoreError(text, operation=operation, backend=backend)


def conflict_kind(exc: BaseException) -> ConflictKind:
    """Which uniqueness rule an eventsourcing IntegrityError broke."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, psycopg.Error) and e.diag.constraint_name:
            return "inbox" if e.diag.constraint_name == "inbox_pkey" else "version"
        if isinstance(e, sqlite3.IntegrityError):
            return "inbox" if "inbox.message_id" in str(e) else "version"
        e = e.__cause__ or e.__context__
    # The recorders' single-row tracking raises a bare IntegrityError when the
    # position does not increase ("Failed to record tracking for <name> <id>").
    return "tracking" if str(exc).startswith("Failed to record tracking") else "version"


_DB_ERRORS: tuple[type[BaseException], ...] = (
    es.PersistenceError,
    es.ConnectionPoolClosedError,
    sqlite3.Error,
    psycopg.Error,
)


class ProcessRecorder(Protocol):
    """The parts of eventsourcing's ProcessRecorder the store uses."""

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None: ...
    def select_events(
        self, originator_id: UUID | str, *, gt: int | None = None, lte: int | None = None
    ) -> Sequence[StoredEvent]: ...
    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Any]: ...
    def max_notification_id(self) -> int | None: ...
    def max_tracking_id(self, application_name: str) -> int | None: ...
    def insert_tracking(self, tracking: Tracking) -> None: ...
    def create_table(self) -> None: ...


class BaseStore:
    """`EventStore` implementation shared by both backends."""

    dialect: str = ""

    def __init__(self, url: str, recorder: ProcessRecorder) -> None:
        self.url = url
        self._recorder = recorder
        self._closed = False

    # -- backend hooks ---------------------------------------------------
    def _seen(self, message_ids: Sequence[str]) -> set[str]:
        raise NotImplementedError

    def _max_versions(self, stream_ids: Sequence[UUID]) -> dict[UUID, int]:
        raise NotImplementedError

    def _view_transaction(self) -> Any:  # context manager yielding a ViewTransaction
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------
    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        if self._closed:
            msg = f"{operation} failed: the store is closed"
            raise StoreError(msg, operation=operation, backend=self.dialect)
        try:
            yield
        except _DB_ERRORS as exc:
            raise map_error(exc, operation, self.dialect) from exc

    def _read_op(self, operation: str, call: Callable[[], T]) -> T:
        """A read, tried once more when its connection turned out dead: the backend has
        replaced its connections by then (services/store/reconnect.py), so a server that
        restarted while this process was idle costs the caller nothing. A write is not
        retried here: whether it committed is unknown, and its caller decides again."""
        try:
            with self._errors(operation):
                return call()
        except StoreUnavailableError:
            self._before_retry()
            with self._errors(operation):
                return call()

    def _before_retry(self) -> None:
        """Backend hook: what to wait for before a read is tried again (PostgreSQL: a probe)."""

    def _create_tables(self) -> None:
        # Two processes opening a fresh database at once can race on CREATE/initial
        # tracking rows; the loser's second attempt finds everything in place.
        for attempt in range(5):
            try:
                with self._errors("open"):
                    self._recorder.create_table()
                return
            except StoreError as exc:
                racy = (es.IntegrityError, es.ProgrammingError, es.OperationalError)
                if attempt == 4 or not isinstance(exc.__cause__, racy):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _conflict(
        self,
        exc: BaseException,
        events: Sequence[NewEvent],
        inbox: Sequence[str],
        tracking: tuple[str, int] | None,
        operation: str = "append",
    ) -> ConcurrencyError:
        kind = conflict_kind(exc)
        stream_ids: tuple[UUID, ...] = ()
        message_ids: tuple[str, ...] = ()
        try:  # best-effort details; the store may have moved on since
            if kind == "version" and events:
                counts = Counter((e.stream_id, e.version) for e in events)
                dup = {sid for (sid, _), n in counts.items() if n > 1}
                lowest: dict[UUID, int] = {}
                for ev in events:
                    lowest[ev.stream_id] = min(ev.version, lowest.get(ev.stream_id, ev.version))
                current = self._max_versions(list(lowest))
                dup |= {s for s, v in lowest.items() if current.get(s, 0) >= v}
                stream_ids = tuple(s for s in lowest if s in dup)
            elif kind == "inbox":
                dups = {m for m, n in Counter(inbox).items() if n > 1}
                message_ids = tuple(sorted(dups | self._seen(list(dict.fromkeys(inbox)))))
        except Exception:  # noqa: BLE001 - diagnostics must not mask the conflict
            pass
        detail = {
            "version": f"streams {[str(s) for s in stream_ids]}",
            "inbox": f"message ids {list(message_ids)}",
            "tracking": f"tracking {tracking}",
        }[kind]
        return ConcurrencyError(
            f"{operation} conflict ({kind}): {detail}; nothing was stored",
            kind=kind,
            operation=operation,
            backend=self.dialect,
            stream_ids=stream_ids,
            message_ids=message_ids,
            tracking=tracking,
        )

    # -- EventStore ------------------------------------------------------
    def append(
        self,
        events: Sequence[NewEvent],
        *,
        inbox: Sequence[str] = (),
        tracking: tuple[str, int] | None = None,
    ) -> list[int]:
        if not events and not inbox and tracking is None:
            return []
        stored = [StoredEvent(e.stream_id, e.version, e.type, e.data) for e in events]
        kwargs: dict[str, Any] = {"inbox": list(inbox)}
        if tracking is not None:
            kwargs["tracking"] = Tracking(tracking[0], tracking[1])
        with self._errors("append"):
            try:
                ids = self._recorder.insert_events(stored, **kwargs)
            except es.IntegrityError as exc:
                raise self._conflict(exc, events, inbox, tracking) from exc
        positions = list(ids or [])
        if len(positions) != len(events):  # pragma: no cover - recorder contract
            msg = f"append stored {len(events)} events but got {len(positions)} positions"
            raise StoreError(msg, operation="append", backend=self.dialect)
        return positions

    def load(
        self, stream_id: UUID, after_version: int = 0, upto_version: int | None = None
    ) -> list[StoredRecord]:
        rows = self._read_op("load", lambda: self._recorder.select_events(
            stream_id, gt=after_version or None, lte=upto_version))
        return [
            StoredRecord(0, _uuid(r.originator_id), r.originator_version, r.topic, bytes(r.state))
            for r in rows
        ]

    def load_many(self, stream_ids: Sequence[UUID]) -> dict[UUID, list[StoredRecord]]:
        """Whole histories of many streams in one round trip (cache misses of a batch)."""
        ids = list(dict.fromkeys(stream_ids))
        out: dict[UUID, list[StoredRecord]] = {i: [] for i in ids}
        if not ids:
            return out
        rows = self._read_op("load_many", lambda: self._load_many(ids))
        for oid, version, topic, state in rows:
            sid = _uuid(oid)
            out[sid].append(StoredRecord(0, sid, version, topic, bytes(state)))
        return out

    def _load_many(self, stream_ids: Sequence[UUID]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def read(self, after: int, limit: int, types: Sequence[str] = ()) -> list[StoredRecord]:
        if limit <= 0:
            return []
        rows = self._read_op("read", lambda: self._recorder.select_notifications(
            after, limit, topics=list(types), inclusive_of_start=False))
        return [
            StoredRecord(r.id, _uuid(r.originator_id), r.originator_version, r.topic, bytes(r.state))
            for r in rows
        ]

    def head(self) -> int:
        return self._read_op("head", self._recorder.max_notification_id) or 0

    def follow(self, after: int, limit: int, types: Sequence[str]) -> tuple[list[StoredRecord], int]:
        # The head is taken before the read: everything at or below it is committed (positions
        # are handed out in commit order), so a read that came back short has seen every
        # event of `types` up to it, and the events of other types in between need no second look.
        head = self.head()
        records = self.read(after, limit, types)
        if len(records) >= limit:
            return records, records[-1].position
        return records, max(after, head, records[-1].position if records else 0)

    def seen(self, message_ids: Sequence[str]) -> set[str]:
        if not message_ids:
            return set()
        ids = list(dict.fromkeys(message_ids))
        return self._read_op("seen", lambda: self._seen(ids))

    def prune_inbox(self, older_than: float, *, batch: int = 10_000) -> int:
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than)
        total = 0
        with self._errors("prune_inbox"):
            while (n := self._prune_inbox(cutoff, batch)) > 0:
                total += n
                if n < batch:
                    break
        return total

    def _prune_inbox(self, cutoff: datetime, batch: int) -> int:
        raise NotImplementedError

    def position(self, name: str) -> int:
        return self._read_op("position", lambda: self._recorder.max_tracking_id(name)) or 0

    def track(self, name: str, position: int) -> None:
        with self._errors("track"):
            try:
                self._recorder.insert_tracking(Tracking(name, position))
            except es.IntegrityError as exc:
                raise self._conflict(exc, (), (), (name, position), "track") from exc

    @contextmanager
    def transaction(self) -> Iterator[ViewTransaction]:
        with self._errors("transaction"), self._view_transaction() as tx:
            yield tx

    @contextmanager
    def reader(self) -> Iterator[ViewTransaction]:
        with self._errors("reader"), self._read_transaction() as tx:
            yield tx

    def _read_transaction(self) -> Any:  # backends without a cheaper reader use a rolled-back transaction
        return self._view_transaction()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> BaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.dialect}{' closed' if self._closed else ''}>"


def _uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


class ViewTxBase:
    """Common parts of the backends' view transactions."""

    dialect: str = ""

    def __init__(self, cursor: Any, recorder: Any) -> None:
        self._cursor = cursor
        self._recorder = recorder

    def _sql(self, sql: str) -> str:
        return sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._wrap("execute"):
            self._cursor.execute(self._sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._wrap("executemany"):
            self._cursor.executemany(self._sql(sql), [tuple(r) for r in rows])

    def fetchall(self) -> list[tuple[Any, ...]]:
        with self._wrap("fetchall"):
            return [tuple(r) for r in self._cursor.fetchall()]

    def fetchone(self) -> tuple[Any, ...] | None:
        with self._wrap("fetchone"):
            row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def track(self, name: str, position: int) -> None:
        with self._wrap("track"):
            try:
                self._recorder._insert_tracking(self._cursor, Tracking(name, position))  # noqa: SLF001
            except es.IntegrityError as exc:
                raise ConcurrencyError(
                    f"track conflict (tracking): {name!r} is already at or past {position}",
                    kind="tracking",
                    operation="transaction.track",
                    backend=self.dialect,
                    tracking=(name, position),
                ) from exc

    def read_log(self, after: int, limit: int) -> list[LogRow]:
        if limit <= 0:
            return []
        with self._wrap("read_log"):
            return self._read_log(after, limit)

    def head(self) -> int:
        with self._wrap("head"):
            return int(self._head() or 0)

    def read_stream(self, stream_id: str, upto_version: int | None = None) -> list[LogRow]:
        with self._wrap("read_stream"):
            return self._read_stream(UUID(stream_id), upto_version if upto_version is not None else 2**62)

    # backend hooks: the notification log on this transaction's connection
    def _read_log(self, after: int, limit: int) -> list[LogRow]:
        raise NotImplementedError

    def _read_stream(self, stream_id: UUID, upto_version: int) -> list[LogRow]:
        raise NotImplementedError

    def _head(self) -> int | None:
        raise NotImplementedError

    @contextmanager
    def _wrap(self, operation: str) -> Iterator[None]:
        try:
            yield
        except _DB_ERRORS as exc:
            raise map_error(exc, f"transaction.{operation}", self.dialect) from exc
