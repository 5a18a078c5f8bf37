"""Table-backed views: declared tables, batched writes, and time helpers.

A `TableView` declares its tables (`TableSpec`s) under logical names and reads
and writes them through `self.t[logical]`, the physical name. The live view
uses `weft_<logical>`; a rebuild binds the same code to shadow tables
(`bound()`), fills them from position 0 and swaps them in (rebuild.py).

Writes are batched: rows are merged per key in Python, then `write_rows` sends
them in one statement (PostgreSQL: all rows as one json parameter;
SQLite: `executemany` of one prepared statement), which is what lets a view
catch up at tens of thousands of events per second.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import orjson

from services.store import StoredRecord, ViewTransaction

_IN_SIZES = (1, 4, 16, 64, 256)


_TEXT_C = 'TEXT COLLATE "C"'


@dataclass(frozen=True)
class TableSpec:
    columns: tuple[tuple[str, str], ...]  # (name, SQL type and constraints)
    key: tuple[str, ...]
    indexes: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (suffix, columns)
    # PostgreSQL: rows updated in place (HOT) when their page has room and no indexed column
    # changes; the upserted views leave room, so an update does not touch every index.
    fillfactor: int = 100

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)

    def ddl(self, table: str, dialect: str = "sqlite") -> str:
        # PostgreSQL: byte-order text ("C"): the keys are ids and ISO times, whose byte
        # order is their order, and btree upserts run ~2x faster than under a locale.
        pg = dialect == "postgresql"
        cols = ", ".join(f"{c} {t.replace('TEXT', _TEXT_C, 1) if pg else t}" for c, t in self.columns)
        with_ = f" WITH (fillfactor = {self.fillfactor})" if pg and self.fillfactor < 100 else ""
        return f"CREATE TABLE IF NOT EXISTS {table} ({cols}, PRIMARY KEY ({', '.join(self.key)})){with_}"

    def index_ddl(self, table: str, index_base: str | None = None) -> list[str]:
        base = index_base or table
        return [
            f"CREATE INDEX IF NOT EXISTS {base}_{suffix} ON {table} ({', '.join(cols)})"
            for suffix, cols in self.indexes
        ]


class TableView:
    """Base of the built-in views. Subclasses set name, types, version, tables and `apply`."""

    name: str = ""
    types: tuple[str, ...] = ()
    version: int = 1  # bump when the rows a given history produces change: triggers a rebuild
    tables: dict[str, TableSpec] = {}

    def __init__(self, *, prefix: str = "weft_", name: str | None = None) -> None:
        if name is not None:
            self.name = name
        self.t = {logical: f"{prefix}{logical}" for logical in self.tables}

    def bound(self, physical: dict[str, str]) -> TableView:
        """The same view writing to other tables (a rebuild's shadow tables)."""
        clone = copy.copy(self)
        clone.t = dict(physical)
        return clone

    def create(self, tx: ViewTransaction, *, indexes: bool = True) -> None:
        for logical, spec in self.tables.items():
            tx.execute(spec.ddl(self.t[logical], tx.dialect))
            if indexes:
                for sql in spec.index_ddl(self.t[logical]):
                    tx.execute(sql)

    def apply(self, tx: ViewTransaction, records: Sequence[StoredRecord]) -> None:
        self.apply_events(tx, parse(records))

    def apply_events(self, tx: ViewTransaction, events: Sequence[Ev]) -> None:  # pragma: no cover
        raise NotImplementedError


@dataclass(slots=True, frozen=True)
class Ev:
    """A stored event, decoded once per batch and shared by every view of the batch."""

    position: int
    stream: str  # the stream (execution) id as text
    version: int  # place in its stream, 1-based
    type: str
    data: dict[str, Any]
    at: str  # data["at"], normalised (norm_time)


def ev(position: int, stream: str, version: int, kind: str, raw: bytes) -> Ev:
    data = orjson.loads(raw)
    return Ev(position, stream, version, kind, data, norm_time(data["at"]))  # type: ignore[arg-type]


def parse(records: Sequence[StoredRecord]) -> list[Ev]:
    return [ev(r.position, str(r.stream_id), r.version, r.type, r.data) for r in records]


# ---- batched writes ------------------------------------------------------------------------

_sql_cache: dict[tuple[Any, ...], str] = {}
_PG_CAST = {"TEXT": "text", "INTEGER": "integer", "BIGINT": "bigint", "DOUBLE PRECISION": "float8"}


def _write_sql(dialect: str, table: str, spec: TableSpec, update: str | None) -> str:
    cache_key = (dialect, table, spec, update)
    sql = _sql_cache.get(cache_key)
    if sql is None:
        cols = ", ".join(spec.names)
        if dialect == "postgresql":
            # All rows as ONE jsonb array of arrays: a short statement PostgreSQL parses once;
            # orjson writes tuples as arrays in C, and the server unpacks them cheaply.
            values = ", ".join(f"(r->>{i})::{_PG_CAST[_base(t)]}" for i, (_, t) in enumerate(spec.columns))
            sql = f"INSERT INTO {table} ({cols}) SELECT {values} FROM jsonb_array_elements(?::jsonb) r"
        else:
            sql = f"INSERT INTO {table} ({cols}) VALUES ({','.join('?' * len(spec.names))})"
        sql += f" ON CONFLICT ({', '.join(spec.key)}) " + (f"DO UPDATE SET {update}" if update else "DO NOTHING")
        _sql_cache[cache_key] = sql
    return sql


def _base(sql_type: str) -> str:
    return sql_type.upper().replace("NOT NULL", "").strip()


def write_rows(
    tx: ViewTransaction, table: str, spec: TableSpec, rows: Sequence[Sequence[Any]], *, update: str | None = None,
) -> None:
    """INSERT many rows (every column of `spec`, in order); on a key conflict run `update`
    (a SET list that may use `excluded.`) or do nothing.

    Rows must have distinct keys (PostgreSQL refuses to update one row twice in a statement).
    """
    if not rows:
        return
    sql = _write_sql(tx.dialect, table, spec, update)
    if tx.dialect == "postgresql":
        payload = orjson.dumps(rows).decode()
        if "\\u0000" in payload:  # PostgreSQL text cannot hold NUL: replace it, as a reader would see it
            payload = orjson.dumps([[_no_nul(v) for v in row] for row in rows]).decode()
        tx.execute(sql, (payload,))
    else:
        tx.executemany(sql, rows)  # sqlite3 loops in C over one prepared statement


def _no_nul(value: Any) -> Any:
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def select_in(
    tx: ViewTransaction, sql_head: str, column: str, values: Iterable[Any], tail: str = ""
) -> list[tuple[Any, ...]]:
    """Rows of `sql_head WHERE column IN (...)`, for any number of values, in few statement shapes."""
    values = list(dict.fromkeys(values))
    out: list[tuple[Any, ...]] = []
    i = 0
    while i < len(values):
        left = len(values) - i
        # The smallest fixed size that holds the rest, padded: one statement, few distinct texts.
        size = next((s for s in _IN_SIZES if s >= left), _IN_SIZES[-1])
        chunk = values[i : i + size]
        chunk += [chunk[0]] * (size - len(chunk))  # padding repeats a value: IN ignores duplicates
        tx.execute(f"{sql_head} WHERE {column} IN ({','.join('?' * size)}){tail}", chunk)
        out.extend(tx.fetchall())
        i += size
    return out


def table_exists(tx: ViewTransaction, table: str) -> bool:
    if tx.dialect == "postgresql":
        tx.execute("SELECT to_regclass(?) IS NOT NULL", (table,))  # resolved in the store's schema
    else:
        tx.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
    row = tx.fetchone()
    return bool(row and row[0])


# ---- values ----------------------------------------------------------------------------------


def norm_time(value: str | None) -> str | None:
    """An ISO 8601 time as fixed-width UTC text, so that text order is time order."""
    if value is None:
        return None
    if len(value) == 27 and value[-1] == "Z" and value[19] == ".":  # pydantic's usual shape
        return value[:26] + "+00:00"
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


def millis(start: str | None, end: str | None) -> float | None:
    """Milliseconds from one ISO time to another (either may be missing)."""
    if not start or not end:
        return None
    a, b = datetime.fromisoformat(start), datetime.fromisoformat(end)
    if a.tzinfo is None:
        a = a.replace(tzinfo=timezone.utc)
    if b.tzinfo is None:
        b = b.replace(tzinfo=timezone.utc)
    return round((b - a).total_seconds() * 1000, 3)


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


NO_ITEM = -1  # map item of a plain (non-map) step in key columns, which may not be NULL


def item_of(value: int | None) -> int:
    return NO_ITEM if value is None else value


def item_out(value: int) -> int | None:
    return None if value == NO_ITEM else value
