"""Overlap a batch's database writes with the Python work of the next view.

`Pipelined` wraps a view transaction: an INSERT is handed to a writer thread
and the call returns at once, so the caller goes on building the next view's
rows while the database works (psycopg and sqlite3 release the GIL while they
wait). Anything else (a SELECT, a fetch, tracking, the end of the transaction)
first waits for the write in flight, so statements still run one at a time,
in order, on the one connection, and an error surfaces before the commit.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

from services.store import ViewTransaction
from services.store.ports import LogRow


class Pipelined:
    def __init__(self, tx: ViewTransaction, writer: ThreadPoolExecutor):
        self.tx, self.writer = tx, writer
        self.dialect = tx.dialect
        self._pending: Future[None] | None = None

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the write's error here, inside the transaction

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.flush()
        if sql.startswith("INSERT"):
            self._pending = self.writer.submit(self.tx.execute, sql, params)
        else:
            self.tx.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.flush()
        if sql.startswith("INSERT"):
            self._pending = self.writer.submit(self.tx.executemany, sql, rows)
        else:
            self.tx.executemany(sql, rows)

    def fetchall(self) -> list[tuple[Any, ...]]:
        self.flush()
        return self.tx.fetchall()

    def fetchone(self) -> tuple[Any, ...] | None:
        self.flush()
        return self.tx.fetchone()

    def track(self, name: str, position: int) -> None:
        self.flush()
        self.tx.track(name, position)

    def read_log(self, after: int, limit: int) -> list[LogRow]:
        self.flush()
        return self.tx.read_log(after, limit)

    def head(self) -> int:
        self.flush()
        return self.tx.head()

    def read_stream(self, stream_id: str, upto_version: int | None = None) -> list[LogRow]:
        self.flush()
        return self.tx.read_stream(stream_id, upto_version)
