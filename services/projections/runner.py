"""Runs projections: read a batch past the tracked position, apply, track, commit.

Views at the same position are served together: one read of the log (the
next batch is read and decoded ahead, in a thread), then the rows of each view
written with its tracking record and its row in `weft_projections` in the same
transaction, so a batch is applied exactly once even if the process is killed
half-way through it. On SQLite all views share one transaction (there is one
writer anyway); on PostgreSQL they are spread over `lanes` transactions that
run side by side on their own connections.

`weft_projections` (one row per view) mirrors the tracked position and holds
what `weft projections status` shows (version, rebuild generation, rate). Each
batch transaction first locks the view's row and checks the position it read
from is still the recorded one: if a rebuild swapped the view in meanwhile (or
another projector got there first), the batch is dropped and read again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Protocol, Sequence

from services.faults import crash_point
from services.projections import log
from services.projections.pipeline import Pipelined
from services.projections.tables import Ev, table_exists
from services.retrying import Backoff, sleep_or_stop
from services.store import EventStore, StoredRecord, ViewTransaction
from services.store.ports import LogRow

logger = logging.getLogger("weft.projections")
META = "weft_projections"
_META_DDL = (
    f"CREATE TABLE IF NOT EXISTS {META} (name TEXT PRIMARY KEY, position BIGINT NOT NULL, version INTEGER NOT NULL, "
    "generation INTEGER NOT NULL DEFAULT 0, applied BIGINT NOT NULL DEFAULT 0, rate DOUBLE PRECISION, "
    "updated_at TEXT, rebuilt_at TEXT, rebuild_token TEXT, rebuild_position BIGINT, rebuild_head BIGINT, "
    "rebuild_heartbeat TEXT)"
)


class Projection(Protocol):
    name: str

    @property  # read-only, so a view may declare its event types as a tuple
    def types(self) -> Sequence[str]: ...

    def create(self, tx: ViewTransaction) -> None: ...
    def apply(self, tx: ViewTransaction, records: Sequence[StoredRecord]) -> None: ...


class Moved(Exception):
    """The view's recorded position is not the one this batch was read from."""


def now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def ensure_meta(tx: ViewTransaction) -> None:
    tx.execute(_META_DDL)


def lock_meta(tx: ViewTransaction, name: str) -> tuple[Any, ...] | None:
    """The view's meta row (position, version, generation), locked until the transaction ends.

    SQLite needs no row lock: its write transactions (BEGIN IMMEDIATE) run one at a time.
    """
    lock = " FOR UPDATE" if tx.dialect == "postgresql" else ""
    tx.execute(f"SELECT position, version, generation FROM {META} WHERE name = ?{lock}", (name,))
    return tx.fetchone()


def relax_commit(tx: ViewTransaction) -> None:
    """PostgreSQL: do not wait for this commit's WAL flush. A crash may forget the last
    batches, but their rows and tracking record together, so they are simply applied
    again: exactly once still holds, and catching up does not wait on fsync."""
    if tx.dialect == "postgresql":
        tx.execute("SET LOCAL synchronous_commit = off")


def view_version(view: Any) -> int:
    return int(getattr(view, "version", 0))


def rebuildable(view: Any) -> bool:
    return bool(getattr(view, "tables", None)) and hasattr(view, "bound")


def prepare(store: EventStore, views: Sequence[Projection]) -> list[Any]:
    """Set views up for following: the meta table, each view's row in it and its tables.

    Returns the views whose tables an older version of their code built (no meta
    row but a tracked position or tables, or another recorded version): they need
    a rebuild before they are followed, and are not created here. Whatever creates
    a view's tables should do it through here, so that its version is recorded.
    """
    outdated = []
    with store.transaction() as tx:
        ensure_meta(tx)
    for view in views:
        tracked = store.position(view.name)  # outside the transaction: SQLite's pool rule (log.py)
        with store.transaction() as tx:
            row = lock_meta(tx, view.name)
            if row is None:
                # No meta row: a fresh view, or tables built by code from before this
                # table existed, whose rows need a rebuild (version 0).
                old = tracked > 0 or any(table_exists(tx, t) for t in getattr(view, "t", {}).values())
                version = 0 if old else view_version(view)
                tx.execute(f"INSERT INTO {META} (name, position, version) VALUES (?, ?, ?) "
                           "ON CONFLICT (name) DO NOTHING", (view.name, tracked, version))
                row = (tracked, version, 0)
            if rebuildable(view) and row[1] != view_version(view):
                outdated.append(view)
                continue
            view.create(tx)
    return outdated


class Projector:
    def __init__(
        self, store: EventStore, views: Sequence[Projection], *, batch: int = 10_000, poll_interval: float = 0.1,
        auto_rebuild: bool = True, lanes: int = 2,
    ):
        self.store, self.views, self.batch, self.poll_interval = store, list(views), batch, poll_interval
        self.auto_rebuild = auto_rebuild
        self._window: dict[str, deque[tuple[float, float, int]]] = {v.name: deque() for v in self.views}
        self._types = {v.name: frozenset(v.types) for v in self.views}
        self.lanes = max(1, lanes)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="projector-read")
        self._lane_pool = ThreadPoolExecutor(max_workers=max(1, self.lanes - 1), thread_name_prefix="projector-lane")
        self._writers = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"projector-write{i}")
                         for i in range(self.lanes)]
        self._ahead: tuple[tuple[int, frozenset[str]], Future[Any]] | None = None
        self._woken: asyncio.Event | None = None  # set by wake() while run() follows
        # views whose tables an older code version built: rebuilt before they are followed
        self.outdated: list[Any] = prepare(store, self.views)

    # ---- following -------------------------------------------------------------------------

    def _rebuild_outdated(self) -> None:
        from services.projections.rebuild import RebuildBusy, rebuild

        for view in list(self.outdated):
            logger.warning("view %s was built by another version of its code: rebuilding it", view.name)
            try:
                rebuild(self.store, view, batch=max(self.batch, 5000))
            except RebuildBusy as exc:
                logger.info("%s", exc)
                continue
            self.outdated.remove(view)

    def catch_up_once(self) -> int:
        """Apply one batch to every view; returns how many events were read and applied."""
        if self.outdated:
            if not self.auto_rebuild:
                raise RuntimeError(f"views need a rebuild: {[v.name for v in self.outdated]}")
            self._rebuild_outdated()
        live = [v for v in self.views if v not in self.outdated]
        if not live:
            return 0
        with self.store.reader() as tx:
            tx.execute(f"SELECT name, position FROM {META}")
            positions = dict(tx.fetchall())
        groups: dict[int, list[Any]] = {}
        for view in live:
            groups.setdefault(int(positions.get(view.name, 0)), []).append(view)
        done = 0
        for after, group in sorted(groups.items()):
            try:
                done += self._batch(after, group)
            except Moved:
                done += 1  # someone else moved it on: not idle, look again at once
        return done

    def _batch(self, after: int, views: list[Any]) -> int:
        started = time.monotonic()
        types = frozenset().union(*(self._types[v.name] for v in views))
        ahead, self._ahead = self._ahead, None
        # Waited for before any transaction: a thread holding SQLite's writer must not wait
        # on another that needs a pooled connection (log.py).
        prefetched = ahead[1].result() if ahead is not None and ahead[0] == (after, types) else None
        lanes = self._lanes(views)
        if len(lanes) == 1:
            with self.store.transaction() as tx:
                relax_commit(tx)
                self._check(tx, views, after)
                rows, new, parsed = prefetched or self._read(tx, after, types)
                if new <= after:
                    return 0
                self._read_next(after, new, types)
                self._apply(tx, views, rows, parsed, types, new, started, self._writers[0], first=True)
            return max(len(rows), 1)
        # PostgreSQL: the views' transactions run side by side on their own connections
        # (each view is tracked on its own, so each lane commits on its own).
        rows, new, parsed = prefetched or self._read(None, after, types)
        if new <= after:
            return 0
        self._read_next(after, new, types)
        others = [self._lane_pool.submit(self._lane, lane, after, new, rows, parsed, types, started, i)
                  for i, lane in enumerate(lanes[1:], 1)]
        errors: list[BaseException] = []
        try:
            self._lane(lanes[0], after, new, rows, parsed, types, started, 0)
        except BaseException as exc:  # noqa: BLE001 - after the other lanes have finished
            errors.append(exc)
        for f in others:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:  # a real error wins over a Moved
            raise next((e for e in errors if not isinstance(e, Moved)), errors[0])
        return max(len(rows), 1)

    def _read(self, tx: ViewTransaction | None, after: int,
              types: frozenset[str]) -> tuple[list[LogRow], int, list[Ev]]:
        """A batch past `after`, and its events decoded once for every view (`tx` None: on a reader)."""
        rows, new = log.read_batch(self.store, tx, after, self.batch, sorted(types))
        return rows, new, log.events(rows)

    def _lanes(self, views: list[Any]) -> list[list[Any]]:
        if self.store.dialect != "postgresql" or self.lanes < 2 or len(views) < 2:
            return [views]
        lanes: list[list[Any]] = [[] for _ in range(min(self.lanes, len(views)))]
        load = [0] * len(lanes)
        for view in sorted(views, key=lambda v: -getattr(v, "cost", 1)):  # heaviest first, to the lightest lane
            i = load.index(min(load))
            lanes[i].append(view)
            load[i] += getattr(view, "cost", 1)
        return lanes

    def _lane(self, views: list[Any], after: int, new: int, rows: list[LogRow], parsed: list[Ev],
              types: frozenset[str], started: float, index: int) -> None:
        with self.store.transaction() as tx:
            relax_commit(tx)
            self._check(tx, views, after)
            self._apply(tx, views, rows, parsed, types, new, started, self._writers[index], first=index == 0)

    def _check(self, tx: ViewTransaction, views: list[Any], after: int) -> None:
        for view in sorted(views, key=lambda v: v.name):  # one lock order: no deadlocks between projectors
            row = lock_meta(tx, view.name)
            if row is None or int(row[0]) != after:
                raise Moved(view.name)

    def _read_next(self, after: int, new: int, types: frozenset[str]) -> None:
        if new - after >= self.batch // 2:
            # More is waiting: read and decode the next batch in a thread while this one
            # is written (the database waits release the GIL).
            self._ahead = ((new, types), self._pool.submit(self._read, None, new, types))

    def _apply(self, tx: ViewTransaction, views: list[Any], rows: list[LogRow], parsed: list[Ev],
               types: frozenset[str], new: int, started: float, writer: ThreadPoolExecutor, *, first: bool) -> None:
        counts = {}
        piped = Pipelined(tx, writer)
        try:
            for i, view in enumerate(views):
                wanted = self._types[view.name]
                if hasattr(view, "apply_events"):
                    mine = parsed if wanted >= types else [e for e in parsed if e.type in wanted]
                    if mine:
                        view.apply_events(piped, mine)
                else:
                    mine = log.records(rows, wanted)
                    if mine:
                        view.apply(piped, mine)
                counts[view.name] = len(mine)
                if first and i == 0:
                    piped.flush()
                    crash_point("projector.mid_batch")  # rows written, nothing tracked or committed yet
        finally:
            piped.flush()  # never leave a write running past the end of the transaction
        stamp = now_text()
        for view in views:
            rate = self._rate(view.name, started, len(rows))
            tx.track(view.name, new)
            tx.execute(f"UPDATE {META} SET position = ?, applied = applied + ?, rate = ?, updated_at = ? "
                       "WHERE name = ?", (new, counts[view.name], rate, stamp, view.name))

    def close(self) -> None:
        """Stop the projector's threads (a read ahead is dropped). Also the end of a `with` block."""
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._lane_pool.shutdown(wait=True)
        for writer in self._writers:
            writer.shutdown(wait=True)

    def __enter__(self) -> Projector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rate(self, name: str, started: float, n: int, window: float = 10.0) -> float:
        """Events per second over the last `window` seconds of batches."""
        w = self._window[name]
        end = time.monotonic()
        w.append((started, end, n))
        while w and w[0][1] < end - window:
            w.popleft()
        span = max(end - w[0][0], 1e-3)
        return round(sum(x[2] for x in w) / span, 1)

    def catch_up(self, *, limit: int | None = None) -> int:
        """Apply batches until every view is at the head (or `limit` events were applied)."""
        total = 0
        while (n := self.catch_up_once()) > 0:
            total += n
            if limit is not None and total >= limit:
                break
        return total

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._follow(stop)
        finally:
            await asyncio.to_thread(self.close)

    def wake(self) -> None:
        """Look at the log now rather than at the next poll (e.g. the dead-letter ingester has
        just stored some). Call it from the loop that runs `run()`."""
        if self._woken is not None:
            self._woken.set()

    async def _follow(self, stop: asyncio.Event) -> None:
        backoff = Backoff(first=self.poll_interval)
        self._woken = woken = asyncio.Event()
        while not stop.is_set():
            woken.clear()
            try:
                n = await asyncio.to_thread(self.catch_up_once)
            except Exception:  # the store is away: a wake must not cut the wait short
                await backoff.failed(stop, logger, "projector")
                continue
            backoff.reset()
            if n == 0:
                await sleep_or_stop(stop, self.poll_interval, wake=woken)


def catch_up(store: EventStore, views: Sequence[Projection], *, limit: int | None = None,
             auto_rebuild: bool = True) -> int:
    """Bring these views up to date from this process (at most about `limit` events), e.g. before a
    command or a request reads them; a running projector may be following them too."""
    with Projector(store, views, auto_rebuild=auto_rebuild) as projector:
        return projector.catch_up(limit=limit)
