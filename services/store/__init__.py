"""Weft's event store adapter: the append-only event log, its notification log
(the outbox followed by the relay and projections), the inbox (consumed message
ids) and follower tracking, on SQLite or PostgreSQL, built on the
`eventsourcing` library's process recorders.

What lives here:
  ports.py     NewEvent, StoredRecord, the errors, and the EventStore /
               ViewTransaction Protocols (no database code)
  _base.py     the EventStore implementation shared by both backends
  sqlite.py    SQLiteStore (WAL, synchronous=FULL, busy timeout; one file)
  postgres.py  PostgresStore (psycopg 3 pool; one schema)
  open_store() chooses the backend from a URL:
      sqlite:///relative/path.db   sqlite:////absolute/path.db   sqlite:///:memory:
      postgresql://user[:password]@host[:port]/dbname[?schema=NAME]

Who may import it: services (orchestrator, relay, projections, gateway, CLI
wiring) may. `contracts/` and the pure core (decide/evolve) must not: they stay
free of I/O, and receive events as plain values.

All methods are blocking and thread-safe; call them from async code with
`asyncio.to_thread`. Errors are `StoreError`s (the database error is kept as
`__cause__`); conflicts are `ConcurrencyError`, after which nothing of the
batch is stored.
"""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import uuid4

from services.store.ports import (
    ConcurrencyError,
    EventStore,
    NewEvent,
    StoreConfigError,
    StoredRecord,
    StoreError,
    StoreUnavailableError,
    ViewTransaction,
)

__all__ = [
    "ConcurrencyError",
    "EventStore",
    "NewEvent",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailableError",
    "StoredRecord",
    "ViewTransaction",
    "open_store",
]

_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def open_store(url: str, *, pool_size: int = 5) -> EventStore:
    """Open (creating tables, and the PostgreSQL schema, if missing) the store at `url`."""
    if pool_size < 1:
        raise _config(f"pool_size must be >= 1, not {pool_size}")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from services.store.sqlite import SQLiteStore

        return SQLiteStore(url, _sqlite_db_name(url), pool_size=pool_size)
    if scheme in ("postgresql", "postgres"):
        from services.store.postgres import PostgresStore

        return PostgresStore(url, pool_size=pool_size, **_postgres_params(url))
    raise _config(f"unsupported store URL {_redact(url)!r}: expected sqlite:///path.db or postgresql://...")


def _sqlite_db_name(url: str) -> str:
    rest = unquote(url[len("sqlite:///") :]) if url.lower().startswith("sqlite:///") else ""
    if not rest or "?" in rest or "#" in rest:
        raise _config(f"bad SQLite URL {url!r}: expected sqlite:///path.db (no query)", "sqlite")
    if rest == ":memory:":  # private to this store; shared by its pool's connections
        return f"file:weft-{uuid4().hex}?mode=memory&cache=shared"
    path = Path(rest).expanduser().absolute()  # sqlite:////abs -> rest "/abs"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"open failed: cannot create {path.parent}: {exc}"
        raise StoreError(msg, operation="open", backend="sqlite") from exc
    return str(path)


def _postgres_params(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"schema"})
    if unknown:
        msg = f"unsupported URL parameter(s) {unknown} in {_redact(url)!r}; only 'schema' is understood"
        raise _config(msg, "postgresql")
    schema = (query.get("schema") or ["public"])[-1] or "public"
    if not _SCHEMA_RE.match(schema):
        raise _config(f"bad schema name {schema!r}: use letters, digits and '_' (at most 63)", "postgresql")
    try:
        port = parts.port or int(os.environ.get("PGPORT") or 5432)
    except ValueError as exc:
        raise _config(f"bad port in {_redact(url)!r}", "postgresql") from exc
    user = unquote(parts.username or "") or os.environ.get("PGUSER") or getpass.getuser()
    return {
        "dbname": unquote(parts.path.lstrip("/")) or os.environ.get("PGDATABASE") or user,
        "host": unquote(parts.hostname or "") or os.environ.get("PGHOST") or "localhost",
        "port": port,
        "user": user,
        "password": unquote(parts.password or "") or os.environ.get("PGPASSWORD", ""),
        "schema": schema,
    }


def _config(message: str, backend: str = "") -> StoreConfigError:
    return StoreConfigError(message, operation="open", backend=backend)


def _redact(url: str) -> str:
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)
