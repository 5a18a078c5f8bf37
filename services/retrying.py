"""Waiting out a broker or store that is away, in the services' long-running loops.

Every consumer loop (orchestrator, worker, relay, triggers, dead letters,
projector) handles a failed round the same way: log it, wait, try again, waiting
longer each time up to a cap, and not at all once a stop is asked for. Other
failures that repeat (a record the relay gives up on, a result a worker cannot
report) are logged through `Throttled`: one line per kind now and then, with a count.
"""

from __future__ import annotations

import asyncio
import logging
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
        detail = f" ({_one_line(exc)})" if exc is not None else ""
        self.log.log(level, message + "%s; %d such failures in the last %.0fs", *args, detail, count, since)
        return True


class Backoff:
    """Exponential wait between failed rounds: `first` doubling up to `cap`, reset by a good round.

    The cap is 1 s: a failed round costs little (the store fails fast while it is down,
    services/store/reconnect.py), and a longer wait is added straight onto the stall
    after the broker or the database comes back.

    Logging is one line per outage, not a traceback per round: the first failure of a
    run is logged (with its traceback only when it is not a known kind of "away"), and
    the good round after it logs how long the run lasted. An unknown error that repeats
    is logged again at most every `REPEAT_S` seconds, with a count.
    """

    REPEAT_S = 30.0

    def __init__(self, first: float = 0.1, cap: float = 1.0):
        self.first, self.cap = first, cap
        self.delay = first
        self.failures = 0
        self._since = 0.0
        self._logged_at = 0.0
        self._what = ""
        self._log: logging.Logger | None = None

    def reset(self) -> None:
        self.delay = self.first
        if self.failures and self._log is not None:
            self._log.warning("%s: working again after %.2fs (%d failed round(s))",
                              self._what, time.monotonic() - self._since, self.failures)
        self.failures = 0

    async def failed(self, stop: asyncio.Event, log: logging.Logger, what: str) -> None:
        """Log the exception being handled (see the class docstring), then wait before the next round."""
        exc = sys.exc_info()[1]
        now = time.monotonic()
        if self.failures == 0:
            self._since, self._what, self._log = now, what, log
        self.failures += 1
        if self.failures == 1 or now - self._logged_at >= self.REPEAT_S:
            self._logged_at = now
            again = "" if self.failures == 1 else f" ({self.failures} failed rounds so far)"
            if away(exc):
                log.warning("%s failed: %s; retrying every %.1fs at most%s", what, _one_line(exc), self.cap, again)
            else:
                log.exception("%s failed, retrying in %.1fs%s", what, self.delay, again)
        else:
            log.debug("%s failed again: %s", what, _one_line(exc))
        await sleep_or_stop(stop, self.delay)
        self.delay = min(self.delay * 2, self.cap)


def away(exc: BaseException | None) -> bool:
    """A store or broker that is unreachable: expected now and then, no traceback needed."""
    from services.broker.ports import BrokerError
    from services.store.ports import StoreUnavailableError

    if isinstance(exc, StoreUnavailableError):
        return True
    return isinstance(exc, BrokerError) and exc.retryable


def _one_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
