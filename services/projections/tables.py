"""Table-backed views: declared tables, batched writes, and time helpers.

A `TableView` declares its tables (`TableSpec`s) under logical names and reads
and writes them through `self.t[logical]`, the physical name. The live view
uses `weft_<logical>`; a rebuild binds the same code to shadow tables
(`bound()`), fills them from position 0 and swaps them in (rebuild.py).

Writes are batched: `write_rows` sends many rows per statement in a few fixed
chunk sizes (so the statement texts repeat and PostgreSQL prepares them once),
merged per key in Python beforehand, which is what lets a view catch up at tens
of thousands of events per second.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import orjson

from services.store import StoredRecord, ViewTransaction

_MAX_PARAMS = 30_000  # below SQLite's 32766 and PostgreSQL's 65535 bind parameters
_CHUNKS = (500, 100, 20, 5, 1)
_IN_SIZES = (1, 4, 16, 64, 256)


@dataclass(frozen=True)
class TableSpec:
    columns: tuple[tuple[str, str], ...]  # (name, SQL type and constraints)
    key: tuple[str, ...]
    indexes: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (suffix, columns)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)

    def ddl(self, table: str) -> str:
        cols = ", ".join(f"{c} {t}" for c, t in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {table} ({cols}, PRIMARY KEY ({', '.join(self.key)}))"

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
            tx.execute(spec.ddl(self.t[logical]))
            if indexes:
                for sql in spec.index_ddl(self.t[logical]):
                    tx.execute(sql)

    def apply(self, tx: ViewTransaction, records: Sequence[StoredRecord]) -> None:  # pragma: no cover
        raise NotImplementedError


# ---- batched writes ------------------------------------------------------------------------

_sql_cache: dict[tuple[Any, ...], str] = {}


def _insert_sql(table: str, columns: Sequence[str], n: int, key: Sequence[str], update: str | None) -> str:
    cache_key = (table, tuple(columns), n, tuple(key), update)
    sql = _sql_cache.get(cache_key)
    if sql is None:
        one = "(" + ",".join("?" * len(columns)) + ")"
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ",".join([one] * n)
        sql += f" ON CONFLICT ({', '.join(key)}) " + (f"DO UPDATE SET {update}" if update else "DO NOTHING")
        if len(_sql_cache) > 2000:
            _sql_cache.clear()
        _sql_cache[cache_key] = sql
    return sql


def write_rows(
    tx: ViewTransaction, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
    key: Sequence[str], update: str | None = None,
) -> None:
    """INSERT many rows; on a key conflict run `update` (a SET list using `excluded.`) or do nothing.

    Rows must have distinct keys (PostgreSQL refuses to update one row twice in a statement).
    """
    if not rows:
        return
    width = len(columns)
    sizes = [s for s in _CHUNKS if s * width <= _MAX_PARAMS] or [1]
    i = 0
    for size in sizes:
        while len(rows) - i >= size:
            chunk = rows[i : i + size]
            params = [v for row in chunk for v in row]
            tx.execute(_insert_sql(table, columns, size, key, update), params)
            i += size


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
