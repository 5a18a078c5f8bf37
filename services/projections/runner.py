"""Runs projections: read a batch past the tracked position, apply, track, commit."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, Sequence

from services.store import EventStore, StoredRecord, ViewTransaction

log = logging.getLogger("weft.projections")


class Projection(Protocol):
    name: str
    types: Sequence[str]

    def create(self, tx: ViewTransaction) -> None: ...
    def apply(self, tx: ViewTransaction, records: Sequence[StoredRecord]) -> None: ...


class Projector:
    def __init__(self, store: EventStore, views: Sequence[Projection], *, batch: int = 1000, poll_interval: float = 0.1):
        self.store, self.views, self.batch, self.poll_interval = store, list(views), batch, poll_interval
        for view in self.views:
            with store.transaction() as tx:
                view.create(tx)

    def catch_up_once(self) -> int:
        """Apply one batch to every view; returns how many events were applied."""
        done = 0
        for view in self.views:
            position = self.store.position(view.name)
            records = self.store.read(position, self.batch, view.types)
            if not records:
                continue
            with self.store.transaction() as tx:
                view.apply(tx, records)
                tx.track(view.name, records[-1].position)
            done += len(records)
        return done

    def catch_up(self) -> int:
        total = 0
        while (n := self.catch_up_once()) > 0:
            total += n
        return total

    async def run(self, stop: asyncio.Event) -> None:
        delay = self.poll_interval
        while not stop.is_set():
            try:
                n = await asyncio.to_thread(self.catch_up_once)
                delay = self.poll_interval
            except Exception:
                log.exception("projector failed, retrying in %.1fs", delay)
                n, delay = 0, min(delay * 2, 5.0)
            if n == 0:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
