"""Waiting out a broker or store that is away, in the services' long-running loops.

Every consumer loop (orchestrator, worker, relay, triggers, dead letters,
projector) handles a failed round the same way: log it, wait, try again, waiting
longer each time up to a cap, and not at all once a stop is asked for. A failure
that repeats is logged as one line per kind now and then, with a count
(`Throttled`), never a traceback per round.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Callable


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


class Throttled:
    """At most one log line per kind of failure every `every` seconds, saying how many there were.

    The first of a kind is logged with its traceback; the ones after it within `every` are only
    counted, and the next line says how many. A loop that fails every 60 ms logs one line per
    `every`, not 5 MB of tracebacks in four minutes."""

    MAX_KINDS = 256  # kinds are types of errors and places: a handful; forget beyond this

    def __init__(self, log: logging.Logger, every: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.log, self.every, self.clock = log, every, clock
        self._kinds: dict[str, list[float]] = {}  # kind -> [time of its last line, count since]

    def failure(self, kind: str, message: str, *args: object, exc: BaseException | None = None,
                level: int = logging.WARNING) -> bool:
        """Log `message % args` for a failure of `kind` unless one was logged less than `every` ago.
        True when a line was written."""
        now = self.clock()
        entry = self._kinds.get(kind)
        if entry is None:
            if len(self._kinds) >= self.MAX_KINDS:
                self._kinds.clear()
            self._kinds[kind] = [now, 0]
            self.log.log(level, message, *args, exc_info=exc)
            return True
        entry[1] += 1
        if now - entry[0] < self.every:
            return False
        count, since = int(entry[1]), now - entry[0]
        entry[0], entry[1] = now, 0
        detail = f" ({type(exc).__name__}: {_one_line(exc)})" if exc is not None else ""
        self.log.log(level, message + "%s; %d such failures in the last %.0fs", *args, detail, count, since)
        return True


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


class Backoff:
    """Exponential wait between failed rounds: `first` doubling up to `cap`, reset by a good round."""

    def __init__(self, first: float = 0.1, cap: float = 5.0, log_every: float = 10.0):
        self.first, self.cap = first, cap
        self.delay = first
        self.log_every = log_every
        self._throttled: Throttled | None = None

    def reset(self) -> None:
        self.delay = self.first

    async def failed(self, stop: asyncio.Event, log: logging.Logger, what: str) -> None:
        """Log the exception being handled, then wait before the next round.

        While the wait still grows, every round is one line (the first of a kind with its traceback);
        at the cap, one line per `log_every` seconds per kind, with a count (Throttled)."""
        if self._throttled is None or self._throttled.log is not log:
            self._throttled = Throttled(log, self.log_every)
        exc = sys.exc_info()[1]
        kind = f"{re.sub(r'[0-9]+', 'N', what)}:{type(exc).__name__}"  # "a batch of 12" and "of 13" are one kind
        if self.delay < self.cap and kind in self._throttled._kinds:
            log.error("%s failed (%s: %s), retrying in %.1fs", what, type(exc).__name__, _one_line(exc), self.delay)
        else:
            self._throttled.failure(kind, "%s failed, retrying in %.1fs", what, self.delay, exc=exc, level=logging.ERROR)
        await sleep_or_stop(stop, self.delay)
        self.delay = min(self.delay * 2, self.cap)
