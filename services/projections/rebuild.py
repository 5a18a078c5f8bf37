"""Rebuild a view from position 0 beside the live one, then swap it in atomically.

1. Claim the rebuild (a token in the view's `weft_projections` row; a second
   rebuild of the same view is refused while the first one's heartbeat is fresh).
2. Fill shadow tables (`<table>__rebuild`) from position 0 in batches. The live
   tables are untouched: reads and the live projector carry on meanwhile.
3. PostgreSQL: index the shadow tables (still outside the swap).
4. Swap, in ONE transaction: lock the view's row (the live projector's next
   batch waits on it), apply what was appended since step 2, drop the live
   tables, rename the shadow ones into their place (and their indexes), move
   the tracking position to where the shadow got. A reader sees the old rows or
   the new ones, never a mix; a crash before commit leaves the old view live.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from services.projections import log
from services.projections.runner import META, ensure_meta, lock_meta, now_text, relax_commit, view_version
from services.store import EventStore, ViewTransaction

SHADOW = "__rebuild"
Progress = Callable[[int, int], None]  # (position reached, head)


class RebuildBusy(RuntimeError):
    """Another rebuild of this view is running (its heartbeat is fresh)."""


@dataclass(slots=True)
class RebuildResult:
    name: str
    events: int  # events applied to the new tables
    position: int  # where the view now is
    seconds: float
    generation: int
    tables: list[str]
    during_swap: int = 0  # events appended while the shadow filled, applied inside the swap

    def as_dict(self) -> dict[str, Any]:
        rate = round(self.events / self.seconds, 1) if self.seconds > 0 else None
        return {"id": self.name, "name": self.name, "events": self.events, "position": self.position,
                "seconds": round(self.seconds, 3), "events_per_s": rate, "generation": self.generation,
                "tables": self.tables, "during_swap": self.during_swap}


def rebuild(
    store: EventStore, view: Any, *, batch: int = 5000, progress: Progress | None = None, stale_after: float = 60.0,
) -> RebuildResult:
    began = time.monotonic()
    token = uuid.uuid4().hex
    _claim(store, view.name, token, stale_after)
    shadow = {logical: f"{physical}{SHADOW}" for logical, physical in view.t.items()}
    sview = view.bound(shadow)
    try:
        with store.transaction() as tx:
            for table in shadow.values():
                tx.execute(f"DROP TABLE IF EXISTS {table}")
            sview.create(tx, indexes=False)  # bulk loads run faster without secondary indexes
        pos, applied = 0, 0
        while True:
            with store.transaction() as tx:
                relax_commit(tx)  # shadow rows only: a crash restarts the rebuild anyway
                _check_token(tx, view.name, token)
                rows, new = log.read_batch(store, tx, pos, batch, view.types)
                if rows:
                    sview.apply_events(tx, log.events(rows))
                head = tx.head()
                tx.execute(f"UPDATE {META} SET rebuild_position = ?, rebuild_head = ?, rebuild_heartbeat = ? "
                           "WHERE name = ?", (new, head, now_text(), view.name))
            done = new == pos or new >= head  # near enough: the swap applies the rest
            pos, applied = new, applied + len(rows)
            if progress is not None:
                progress(pos, max(head, pos))
            if done:
                break
        if store.dialect == "postgresql":
            with store.transaction() as tx:
                for logical, spec in view.tables.items():
                    for sql in spec.index_ddl(shadow[logical]):
                        tx.execute(sql)
        with store.transaction() as tx:
            row = lock_meta(tx, view.name)
            _check_token(tx, view.name, token)
            live_pos = int(row[0]) if row else 0
            before_swap = applied
            while True:  # what was appended since: the live view may be ahead of the shadow
                rows, new = log.read_batch(store, tx, pos, batch, view.types)
                if rows:
                    sview.apply_events(tx, log.events(rows))
                    applied += len(rows)
                if new == pos:
                    break
                pos = new
            for logical, spec in view.tables.items():
                _swap(tx, shadow[logical], view.t[logical], spec)
            if pos > live_pos:
                tx.track(view.name, pos)
            tx.execute(
                f"UPDATE {META} SET position = ?, version = ?, generation = generation + 1, applied = ?, "
                "rebuilt_at = ?, updated_at = ?, rebuild_token = NULL, rebuild_position = NULL, rebuild_head = NULL, "
                "rebuild_heartbeat = NULL WHERE name = ?",
                (pos, view_version(view), applied, now_text(), now_text(), view.name),
            )
            tx.execute(f"SELECT generation FROM {META} WHERE name = ?", (view.name,))
            generation = int(tx.fetchone()[0])
    except BaseException:
        _release(store, view.name, token)
        raise
    if progress is not None:
        progress(pos, pos)
    return RebuildResult(view.name, applied, pos, time.monotonic() - began, generation, list(view.t.values()),
                         applied - before_swap)


def _swap(tx: ViewTransaction, shadow: str, live: str, spec: Any) -> None:
    tx.execute(f"DROP TABLE IF EXISTS {live}")
    tx.execute(f"ALTER TABLE {shadow} RENAME TO {live}")
    if tx.dialect == "postgresql":
        # Index names are per schema: give the live names back, so the next shadow's are free.
        tx.execute(f"ALTER INDEX IF EXISTS {shadow}_pkey RENAME TO {live}_pkey")
        for suffix, _ in spec.indexes:
            tx.execute(f"ALTER INDEX IF EXISTS {shadow}_{suffix} RENAME TO {live}_{suffix}")
    else:
        # SQLite renames the primary key's index with its table; readers keep their
        # snapshot (WAL) while this transaction builds the secondary indexes.
        for sql in spec.index_ddl(live):
            tx.execute(sql)


def _claim(store: EventStore, name: str, token: str, stale_after: float) -> None:
    tracked = store.position(name)  # not inside the transaction: SQLite's pool rule (log.py)
    with store.transaction() as tx:
        head = tx.head()
        ensure_meta(tx)
        row = lock_meta(tx, name)
        if row is None:
            tx.execute(f"INSERT INTO {META} (name, position, version) VALUES (?, ?, 0)", (name, tracked))
        tx.execute(f"SELECT rebuild_token, rebuild_heartbeat FROM {META} WHERE name = ?", (name,))
        other, beat = tx.fetchone()
        if other and beat and _age(beat) < timedelta(seconds=stale_after):
            raise RebuildBusy(f"a rebuild of {name} is already running (last progress at {beat})")
        tx.execute(f"UPDATE {META} SET rebuild_token = ?, rebuild_position = 0, rebuild_head = ?, "
                   "rebuild_heartbeat = ? WHERE name = ?", (token, head, now_text(), name))


def _check_token(tx: ViewTransaction, name: str, token: str) -> None:
    tx.execute(f"SELECT rebuild_token FROM {META} WHERE name = ?", (name,))
    row = tx.fetchone()
    if row is None or row[0] != token:
        raise RebuildBusy(f"the rebuild of {name} was taken over by another one (ours stalled)")


def _release(store: EventStore, name: str, token: str) -> None:
    try:
        with store.transaction() as tx:
            tx.execute(f"UPDATE {META} SET rebuild_token = NULL, rebuild_position = NULL, rebuild_head = NULL, "
                       "rebuild_heartbeat = NULL WHERE name = ? AND rebuild_token = ?", (name, token))
    except Exception:  # noqa: BLE001 - best effort; a stale claim expires by itself
        pass


def _age(stamp: str) -> timedelta:
    return datetime.now(timezone.utc) - datetime.fromisoformat(stamp)
