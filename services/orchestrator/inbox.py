"""Keeping the inbox bounded: message ids older than the retention are forgotten, hourly.

The inbox guards against a result applied twice when the broker redelivers it
(a crash between commit and ack) or a worker publishes it again past the
broker's dedup window. Both happen within minutes: a message is redelivered at
most `max_deliver` times, `ack_wait` apart, and the settings refuse a retention
shorter than that. Past it, a repeated result is still harmless: the core
records at most one result per attempt (decide.py). So the ids need not
be kept forever, and without this the table grows with every step ever run.
"""

from __future__ import annotations

import asyncio
import logging

from services.retrying import sleep_or_stop
from services.store import EventStore

log = logging.getLogger("weft.orchestrator")
EVERY_S = 3600.0


async def prune_inbox(store: EventStore, stop: asyncio.Event, *, retention: float, every: float = EVERY_S) -> None:
    while not stop.is_set():
        try:
            n = await asyncio.to_thread(store.prune_inbox, retention)
            if n:
                log.info("inbox: forgot %d message ids older than %.0fs", n, retention)
        except Exception:  # the store may be away; the next round tries again
            log.exception("inbox: pruning failed")
        await sleep_or_stop(stop, every)
