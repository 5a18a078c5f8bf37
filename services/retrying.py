"""Waiting out a broker or store that is away, in the services' long-running loops.

Every consumer loop (orchestrator, worker, relay, triggers, dead letters,
projector) handles a failed round the same way: log it, wait, try again, waiting
longer each time up to a cap, and not at all once a stop is asked for.
"""

from __future__ import annotations

import asyncio
import logging


async def sleep_or_stop(stop: asyncio.Event, delay: float, wake: asyncio.Event | None = None) -> None:
    """Sleep `delay` seconds, or less if `stop` (or `wake`, for a poller told there is
    something new) is set meanwhile."""
    if wake is None:
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass
        return
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    _, pending = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    for w in pending:
        w.cancel()


class Backoff:
    """Exponential wait between failed rounds: `first` doubling up to `cap`, reset by a good round."""

    def __init__(self, first: float = 0.1, cap: float = 5.0):
        self.first, self.cap = first, cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    async def failed(self, stop: asyncio.Event, log: logging.Logger, what: str) -> None:
        """Log the exception being handled, then wait before the next round."""
        log.exception("%s failed, retrying in %.1fs", what, self.delay)
        await sleep_or_stop(stop, self.delay)
        self.delay = min(self.delay * 2, self.cap)
