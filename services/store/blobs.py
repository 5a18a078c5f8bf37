"""The blob store: large payloads, stored once by their SHA-256 (the claim check's store).

A table (`blobs`) in the event store's own database, created with the event tables:
so it works wherever the events do (`weft up` on SQLite, PostgreSQL, and later beside a
Kafka transport) with nothing more to run or to back up, and a blob is as durable as
the event that refers to it. JetStream's object store was the other choice; it would tie
the claim check to one broker and split a history's data across two systems.

A blob is written before the event that refers to it, in its own transaction: an
event never points at nothing. A blob whose event was then not stored is an orphan,
harmless (content-addressed, it is reused by the next identical payload).

Blocking and thread-safe like the store; call from async code with `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

from services.store.ports import EventStore, StoreError


class BlobNotFound(StoreError, LookupError):
    """No blob with that digest (never stored, or a reference from another database)."""

    non_retryable = True  # a step whose input it was fails for good: it will not appear later


class BlobCorrupt(StoreError):
    """A blob's bytes do not hash to its digest."""

    non_retryable = True


class BlobStore(Protocol):
    """Content-addressed bytes: `put` returns the SHA-256 (hex) it can be read back by."""

    def put(self, data: bytes) -> str:
        """Store `data` once (a second put of the same bytes stores nothing); its SHA-256 hex."""

    def get(self, digest: str) -> bytes:
        """The bytes stored under `digest`, checked against it. BlobNotFound if none."""

    def has(self, digests: Sequence[str]) -> set[str]:
        """Which of these digests are stored."""

    def size(self, digest: str) -> int | None:
        """The size in bytes of a stored blob, None if there is none."""


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SqlBlobStore:
    """`BlobStore` on the event store's database (SQLite or PostgreSQL), through its transactions."""

    def __init__(self, store: EventStore):
        self.store = store

    def put(self, data: bytes) -> str:
        digest = digest_of(data)
        if self.store.dialect == "postgresql":
            self._pg_put(digest, data)
            return digest
        with self.store.transaction() as tx:
            # Look first: a payload seen before (a retried step, a replay) is not sent again.
            tx.execute("SELECT 1 FROM blobs WHERE sha256 = ?", (digest,))
            if tx.fetchone() is None:
                tx.execute("INSERT INTO blobs (sha256, size, data) VALUES (?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                           (digest, len(data), data))
        return digest

    def get(self, digest: str) -> bytes:
        if self.store.dialect == "postgresql":
            row = self._pg_get(digest)
        else:
            with self.store.reader() as tx:
                tx.execute("SELECT data FROM blobs WHERE sha256 = ?", (digest,))
                row = tx.fetchone()
        if row is None:
            raise BlobNotFound(f"no stored payload with SHA-256 {digest}", operation="blobs.get",
                               backend=self.store.dialect)
        data = bytes(row[0])
        if digest_of(data) != digest:
            raise BlobCorrupt(f"the stored payload {digest} does not match its SHA-256", operation="blobs.get",
                              backend=self.store.dialect)
        return data

    def _pg_put(self, digest: str, data: bytes) -> None:
        # A binary parameter (%b): bytea sent as text would be escaped, twice the bytes and the time.
        from psycopg.sql import SQL, Identifier

        store: Any = self.store
        table = Identifier(store.schema)
        with (store._errors("blobs.put"), store._datastore.get_connection() as conn,  # noqa: SLF001
              conn.transaction(), conn.cursor() as curs):
            curs.execute(SQL("SELECT 1 FROM {0}.blobs WHERE sha256 = %s").format(table), (digest,))
            if curs.fetchone() is None:
                curs.execute(SQL("INSERT INTO {0}.blobs (sha256, size, data) VALUES (%s, %s, %b) "
                                 "ON CONFLICT (sha256) DO NOTHING").format(table), (digest, len(data), data))

    def _pg_get(self, digest: str) -> tuple[bytes] | None:
        # A binary result: bytea as text (hex) costs three times as long to fetch and decode.
        from psycopg.sql import SQL, Identifier

        store: Any = self.store
        query = SQL("SELECT data FROM {0}.blobs WHERE sha256 = %s").format(Identifier(store.schema))
        with store._errors("blobs.get"), store._datastore.get_connection() as conn, conn.cursor() as curs:  # noqa: SLF001
            curs.execute(query, (digest,), binary=True)
            row = curs.fetchone()
        if row is None:
            return None
        return (row["data"] if isinstance(row, dict) else row[0],)

    def has(self, digests: Sequence[str]) -> set[str]:
        wanted = list(dict.fromkeys(digests))
        found: set[str] = set()
        with self.store.reader() as tx:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                tx.execute(f"SELECT sha256 FROM blobs WHERE sha256 IN ({','.join('?' * len(chunk))})", chunk)
                found.update(row[0] for row in tx.fetchall())
        return found

    def size(self, digest: str) -> int | None:
        with self.store.reader() as tx:
            tx.execute("SELECT size FROM blobs WHERE sha256 = ?", (digest,))
            row = tx.fetchone()
        return None if row is None else int(row[0])
