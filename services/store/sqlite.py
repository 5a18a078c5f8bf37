"""SQLite backend: eventsourcing's SQLiteProcessRecorder plus an inbox table.

Durability and sharing: every connection uses WAL, `synchronous=FULL` and a busy
timeout, so several processes (the CLI and `weft up`) can share one file. Write
transactions start with `BEGIN IMMEDIATE`, so a transaction that reads before it
writes never fails on a stale snapshot; inside one process writers are also
serialised by the library's pool (one writer connection at a time).

Positions are the events table's rowids. Rows are never deleted and a rolled
back insert releases its rowids, so positions are dense: 1, 2, 3, ...
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import InterfaceError, StoredEvent, Tracking
from eventsourcing.sqlite import (
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteCursor,
    SQLiteDatastore,
    SQLiteProcessRecorder,
    SQLiteTransaction,
)

from services.store._base import BaseStore, ViewTxBase
from services.store.ports import LogRow

BUSY_TIMEOUT_S = 30.0  # wait this long for another process's write lock
POOL_TIMEOUT_S = 30.0  # one writer at a time: waiting for it is normal under load
_CHUNK = 500  # host parameters per IN (...) list


class _Transaction(SQLiteTransaction):
    def __enter__(self) -> SQLiteCursor:
        cursor = self.connection.cursor()
        # IMMEDIATE takes the write lock up front (waiting up to the busy timeout),
        # instead of failing with SQLITE_BUSY when a read later upgrades to a write.
        cursor.execute("BEGIN IMMEDIATE" if self.commit else "BEGIN")
        return cursor


class _Connection(SQLiteConnection):
    @contextmanager
    def transaction(self, *, commit: bool) -> Iterator[SQLiteCursor]:
        with _Transaction(self, commit=commit) as curs, curs:
            yield curs


class _Pool(SQLiteConnectionPool):
    def _create_connection(self) -> SQLiteConnection:
        try:
            c = sqlite3.connect(
                database=self.db_name,
                uri=True,
                check_same_thread=False,  # the pool hands a connection to one thread at a time
                isolation_level=None,  # autocommit; transactions are explicit
                cached_statements=128,
                timeout=self.lock_timeout or BUSY_TIMEOUT_S,
            )
        except (sqlite3.Error, TypeError) as e:
            raise InterfaceError(e) from e
        try:
            if not self.is_sqlite_memory_mode:
                mode = c.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    c.execute("PRAGMA journal_mode=WAL")
                    self.journal_mode_was_changed_to_wal = True
                self.is_journal_mode_wal = True
            c.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            c.close()
            raise InterfaceError(e) from e
        c.row_factory = sqlite3.Row
        return _Connection(sqlite_conn=c, max_age=self.max_age)


class _Datastore(SQLiteDatastore):
    def __init__(self, db_name: str, *, pool_size: int) -> None:  # noqa: D107
        self.pool = _Pool(
            db_name=db_name,
            lock_timeout=int(BUSY_TIMEOUT_S),
            pool_size=pool_size,
            max_overflow=10,
            pool_timeout=POOL_TIMEOUT_S,
        )
        self.single_row_tracking = True
        self.originator_id_type = "uuid"


class WeftSQLiteRecorder(SQLiteProcessRecorder):
    """Process recorder whose insert transaction also records inbox message ids."""

    def construct_create_table_statements(self) -> list[str]:
        statements = super().construct_create_table_statements()
        statements.append(
            "CREATE TABLE IF NOT EXISTS inbox ("
            "message_id TEXT PRIMARY KEY, "
            "recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
            ") WITHOUT ROWID"
        )
        # Large payloads, stored once by their SHA-256 (services/store/blobs.py, the claim check).
        statements.append(
            "CREATE TABLE IF NOT EXISTS blobs ("
            "sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, data BLOB NOT NULL, "
            "stored_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
            ")"
        )
        return statements

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        positions: list[int] = []
        if stored_events:
            rows = [
                (s.originator_id.hex, s.originator_version, s.topic, s.state)  # type: ignore[union-attr]
                for s in stored_events
            ]
            c.executemany(self.insert_events_statement, rows)
            # We hold the write lock and rowids are max(rowid)+1 each: consecutive.
            c.execute("SELECT last_insert_rowid()")
            last = int(c.fetchone()[0])
            positions = list(range(last - len(stored_events) + 1, last + 1))
        inbox: Sequence[str] = kwargs.get("inbox") or ()
        if inbox:
            c.executemany("INSERT INTO inbox (message_id) VALUES (?)", [(m,) for m in inbox])
        tracking: Tracking | None = kwargs.get("tracking")
        if tracking is not None:
            self._insert_tracking(c, tracking)
        return positions


class _SQLiteViewTx(ViewTxBase):
    dialect = "sqlite"

    def _read_log(self, after: int, limit: int) -> list[LogRow]:
        self._cursor.execute(
            "SELECT rowid, originator_id, originator_version, topic, state "
            f"FROM {self._recorder.events_table_name} WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (after, limit),
        )
        return [(r[0], _dashed(r[1]), r[2], r[3], bytes(r[4])) for r in self._cursor.fetchall()]

    def _head(self) -> int | None:
        return self._recorder._max_notification_id(self._cursor)  # noqa: SLF001 - on this connection

    def _read_stream(self, stream_id: UUID, upto_version: int) -> list[LogRow]:
        self._cursor.execute(
            "SELECT rowid, originator_id, originator_version, topic, state "
            f"FROM {self._recorder.events_table_name} WHERE originator_id = ? AND originator_version <= ? "
            "ORDER BY originator_version",
            (stream_id.hex, upto_version),
        )
        return [(r[0], _dashed(r[1]), r[2], r[3], bytes(r[4])) for r in self._cursor.fetchall()]


def _dashed(stream_id: str) -> str:
    # Stream ids are stored as 32 hex digits (see _insert_events); the rest of Weft spells them with dashes.
    h = stream_id
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" if len(h) == 32 else h


class SQLiteStore(BaseStore):
    """`EventStore` on one SQLite file (or a private in-memory database)."""

    dialect = "sqlite"

    def __init__(self, url: str, db_name: str, *, pool_size: int = 5) -> None:
        self._datastore = _Datastore(db_name, pool_size=pool_size)
        super().__init__(url, WeftSQLiteRecorder(self._datastore))
        try:
            self._create_tables()
        except BaseException:
            self._datastore.close()
            raise

    def _seen(self, message_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        with self._datastore.transaction(commit=False) as c:
            for i in range(0, len(message_ids), _CHUNK):
                chunk = message_ids[i : i + _CHUNK]
                c.execute(
                    f"SELECT message_id FROM inbox WHERE message_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                found.update(row[0] for row in c.fetchall())
        return found

    def _prune_inbox(self, cutoff: datetime, batch: int) -> int:
        stamp = cutoff.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # the column's own text form
        with self._datastore.transaction(commit=True) as c:
            c.execute("DELETE FROM inbox WHERE message_id IN "
                      "(SELECT message_id FROM inbox WHERE recorded_at < ? LIMIT ?)", (stamp, batch))
            c.execute("SELECT changes()")  # the library's cursor wrapper has no rowcount
            return int(c.fetchone()[0])

    def _max_versions(self, stream_ids: Sequence[UUID]) -> dict[UUID, int]:
        out: dict[UUID, int] = {}
        with self._datastore.transaction(commit=False) as c:
            for i in range(0, len(stream_ids), _CHUNK):
                chunk = [s.hex for s in stream_ids[i : i + _CHUNK]]
                c.execute(
                    "SELECT originator_id, MAX(originator_version) FROM stored_events "
                    f"WHERE originator_id IN ({','.join('?' * len(chunk))}) GROUP BY originator_id",
                    chunk,
                )
                out.update((UUID(row[0]), int(row[1])) for row in c.fetchall())
        return out

    def _load_many(self, stream_ids: Sequence[UUID]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        with self._datastore.transaction(commit=False) as c:
            for i in range(0, len(stream_ids), _CHUNK):
                chunk = [s.hex for s in stream_ids[i : i + _CHUNK]]
                c.execute(
                    "SELECT originator_id, originator_version, topic, state FROM stored_events "
                    f"WHERE originator_id IN ({','.join('?' * len(chunk))}) "
                    "ORDER BY originator_id, originator_version",
                    chunk,
                )
                rows.extend(tuple(r) for r in c.fetchall())
        return rows

    @contextmanager
    def _read_transaction(self) -> Iterator[_SQLiteViewTx]:
        # A reader connection: WAL lets it read beside the writer, without its lock.
        with self._datastore.transaction(commit=False) as curs:
            yield _SQLiteViewTx(curs, self._recorder)

    @contextmanager
    def _view_transaction(self) -> Iterator[_SQLiteViewTx]:
        with self._datastore.transaction(commit=True) as curs:
            yield _SQLiteViewTx(curs, self._recorder)

    def _close(self) -> None:
        self._datastore.close()
