"""Reading the notification log in batches, for the projector and rebuilds.

A batch is read with `ViewTransaction.read_log` inside the view transaction
that applies it, so the read and the rows made of it are one transaction
(and, on SQLite, a thread holding the writer never asks the pool for a second
connection). A batch read ahead, outside any view transaction, is read in a
reader transaction of its own. The rows are plain tuples, decoded once per
batch for every view (`events`).
"""

from __future__ import annotations

from typing import Sequence
from uuid import UUID

from services.projections.tables import Ev, ev
from services.store import EventStore, StoredRecord, ViewTransaction
from services.store.ports import LogRow


def read_batch(
    store: EventStore, tx: ViewTransaction | None, after: int, limit: int, types: Sequence[str]
) -> tuple[list[LogRow], int]:
    """Events past `after` (at most `limit` read) of these types, and the position they take the reader to.

    The head is read first: every position up to it is committed (the store
    hands positions out in commit order), so when the read comes back short the
    reader may move to the head, past events of other types, and lag shows 0.
    Without `tx`, the batch is read in a reader transaction of its own.
    """
    if tx is None:
        with store.reader() as own:
            return read_batch(store, own, after, limit, types)
    head = tx.head()
    rows = tx.read_log(after, limit)
    last = rows[-1][0] if rows else after
    new = last if len(rows) == limit else max(last, head)
    wanted = frozenset(types)
    return [r for r in rows if r[3] in wanted], max(new, after)


def events(rows: Sequence[LogRow]) -> list[Ev]:
    return [ev(p, s, v, t, d) for p, s, v, t, d in rows]


def records(rows: Sequence[LogRow], types: frozenset[str]) -> list[StoredRecord]:
    return [StoredRecord(p, UUID(s), v, t, d) for p, s, v, t, d in rows if t in types]
