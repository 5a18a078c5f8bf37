"""Coming back from a PostgreSQL restart in well under a second, not half a minute.

After a restart every pooled connection is dead, and psycopg_pool learns that one
checkout at a time (one failure per pooled connection), then rebuilds them on its
own exponential backoff (1, 2, 4, 8, 16 s...). Measured under the fault matrix of
issue 18, that cost 8.8-34.4 s of stall per restart and a traceback per call.

`ReconnectingDatastore` keeps the library's datastore and pool but watches
the connections it hands out:

- the first broken connection (or a pool that cannot connect) opens an outage:
  one log line, then a direct probe of the server;
- while the server does not answer, every call fails at once with the library's
  OperationalError (no pool wait, no backoff inside the call), and the server is
  probed again at most every `PROBE_INTERVAL_S`, by whichever call comes next;
- as soon as a probe connects, the pool is replaced by a fresh one (the old one,
  full of dead connections, is closed in the background) and the outage closes
  with one log line that says how long it lasted.

So an outage costs each service one failed round, and the first call after the
server is back gets a fresh connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError
from eventsourcing.postgres import PostgresDatastore

log = logging.getLogger("weft.store")

PROBE_INTERVAL_S = 0.2  # while down, at most one connection attempt per interval per process
PROBE_TIMEOUT_S = 2  # libpq's connect_timeout is whole seconds; a refused port answers at once


class Outage:
    """The state of one process's view of the database: up, or down since when."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.down_since: float | None = None
        self.failures = 0
        self.last_probe = 0.0
        self.lock = threading.Lock()

    def opened(self, reason: str) -> bool:
        """Record a failure; True for the first of an outage (the one that is logged)."""
        with self.lock:
            self.failures += 1
            if self.down_since is not None:
                return False
            self.down_since = time.monotonic()
        log.warning("%s: the database is unreachable (%s); failing fast and probing every %.1fs",
                    self.name, reason, PROBE_INTERVAL_S)
        return True

    def closed(self) -> None:
        with self.lock:
            since, failures = self.down_since, self.failures
            self.down_since, self.failures = None, 0
        if since is not None:
            log.warning("%s: the database is back after %.2fs (%d failed call(s) meanwhile)",
                        self.name, time.monotonic() - since, failures)

    def probe_due(self) -> bool:
        with self.lock:
            now = time.monotonic()
            if now - self.last_probe < PROBE_INTERVAL_S:
                return False
            self.last_probe = now
            return True


class ReconnectingDatastore(PostgresDatastore):
    """`PostgresDatastore` that fails fast while the server is down and rebuilds its pool at once
    when it is back (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._args, self._kwargs = args, kwargs
        self._conninfo: dict[str, Any] = dict(self.pool.kwargs) if isinstance(self.pool.kwargs, dict) else {}
        self.outage = Outage(f"postgresql {self._conninfo.get('host')}:{self._conninfo.get('port')}")
        self._swap = threading.Lock()
        self._probing = threading.Lock()
        self._closed = False

    @contextmanager
    def get_connection(self) -> Iterator[Any]:
        if self.outage.down_since is not None:
            self._recover_or_fail()
        conn: Any = None
        try:
            with super().get_connection() as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            # A statement error (lock timeout, deadlock) leaves its connection alive: only a
            # dead connection means the server went away. No connection at all within the
            # pool's timeout is either load or an outage: the probe tells which.
            if conn is None:
                self._timed_out(exc)
            elif conn.closed or getattr(conn, "broken", False):
                self._lost(exc)
            raise

    def before_retry(self) -> None:
        """Before a call is tried again: wait until a probe is due, so the retry does probe. Without
        this, a call made just after the server came back (and just after another caller's probe
        found it still starting) would fail fast once more."""
        if self.outage.down_since is None:
            return
        wait = PROBE_INTERVAL_S - (time.monotonic() - self.outage.last_probe)
        if wait > 0:
            time.sleep(wait)

    def _lost(self, exc: BaseException) -> None:
        if self.outage.opened(_one_line(exc)):
            self.outage.last_probe = 0.0  # probe now: maybe only our connections died
            self._recover_or_fail(raise_if_down=False)

    def _timed_out(self, exc: BaseException) -> None:
        if self.outage.down_since is None and not self._probe():
            self.outage.opened(_one_line(exc))

    def _recover_or_fail(self, raise_if_down: bool = True) -> None:
        # One probe at a time: a caller that waited here learns the verdict of the probe that was
        # under way (the server may be back), instead of failing because it was not its turn.
        with self._probing:
            if self.outage.down_since is None:
                return
            if self.outage.probe_due() and self._probe():
                self._renew_pool()
                self.outage.closed()
                return
        if raise_if_down:
            self.outage.failures += 1
            raise OperationalError(f"{self.outage.name} is unreachable (outage in progress)")

    def _probe(self) -> bool:
        info = {k: v for k, v in self._conninfo.items() if k != "row_factory"}
        try:
            psycopg.connect(**info, connect_timeout=PROBE_TIMEOUT_S).close()
        except psycopg.Error:
            return False
        return True

    def _renew_pool(self) -> None:
        with self._swap:
            if self._closed:
                return
            fresh = PostgresDatastore(*self._args, **self._kwargs).pool
            old, self.pool = self.pool, fresh
        # Closing waits for the old pool's workers (which may be sleeping in a reconnect
        # backoff): not on the caller's time.
        threading.Thread(target=_close_quietly, args=(old,), name="weft-pool-close", daemon=True).start()

    def close(self) -> None:
        with self._swap:
            self._closed = True
        super().close()


def _close_quietly(pool: Any) -> None:
    try:
        pool.close(timeout=1.0)
    except Exception:  # noqa: BLE001 - a pool of dead connections may fail to close cleanly
        log.debug("closing a replaced pool failed", exc_info=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
