"""Waiting out a broker or store that is away, in the services' long-running loops.

Every consumer loop (orchestrator, worker, relay, triggers, dead letters,
projector) handles a failed round the same way: log it, wait, try again, waiting
longer each time up to a cap, and not at all once a stop is asked for.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time


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
