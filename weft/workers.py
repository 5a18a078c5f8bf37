"""`weft up --workers N`: step workers in child processes, so that one command uses every core.

The parent (gateway, orchestrator, relay, projections) starts N `weft worker --home HOME`
processes once its stack is ready, restarts one that dies, and stops them (SIGTERM, their
drain grace, then SIGKILL) when it stops. A child dies with its parent however the parent
ends, SIGKILL included: it asks Linux for a SIGTERM when its parent goes (PR_SET_PDEATHSIG),
set by the child itself at start (no preexec_fn in a threaded parent), and where that is
not available a thread watches its parent's pid. On SIGTERM a child hands back its running
steps after its drain grace, like any worker; the broker redelivers them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.settings import Settings

log = logging.getLogger("weft.workers")
PARENT_ENV = "WEFT_PARENT_PID"


def default_processes() -> int:
    """One worker process per core beyond the first, which the parent's services share; at least one."""
    return max(1, (os.cpu_count() or 1) - 1)


class WorkerProcesses:
    def __init__(self, count: int, settings: Settings, home: Path, cwd: Path, log_level: str = "WARNING"):
        self.count, self.settings, self.home, self.cwd, self.log_level = count, settings, home, cwd, log_level
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.restarts = 0
        self._stopping = False

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "WEFT_HOME": str(self.home), PARENT_ENV: str(os.getpid()),
               "WEFT_WORKER_CONCURRENCY": str(self.settings.worker_concurrency),
               "WEFT_STEP_MODULES": self.settings.step_modules or "", "WEFT_LOG_LEVEL": self.log_level,
               "WEFT_DRAIN_GRACE": str(self.settings.drain_grace)}
        for name in ("WEFT_NATS_URL", "WEFT_NATS_USER", "WEFT_NATS_PASSWORD", "WEFT_NATS_PASSWORD_FILE",
                     "WEFT_NATS_ROLE", "WEFT_WORKER_ID", "WEFT_METRICS_PORT", "WEFT_WORKER_PROCESSES"):
            env.pop(name, None)  # the child takes the worker role's credentials from the stack file
        return subprocess.Popen([sys.executable, "-m", "weft", "worker", "--home", str(self.home)],
                                env=env, cwd=self.cwd, stdin=subprocess.DEVNULL)

    def start(self) -> None:
        for i in range(self.count):
            self.procs[i] = self._spawn(i)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart a worker process that died (at most one restart per process per second) until `stop`."""
        last: dict[int, float] = {}
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            if stop.is_set() or self._stopping:
                break
            for i, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                if time.monotonic() - last.get(i, 0.0) < 1.0:
                    continue
                last[i] = time.monotonic()
                log.warning("worker process %d (pid %d) exited %s: starting another", i, proc.pid, proc.returncode)
                self.restarts += 1
                self.procs[i] = self._spawn(i)

    def stop(self) -> None:
        """SIGTERM each, wait for their drain grace (+5 s), SIGKILL what is left."""
        self._stopping = True
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.settings.drain_grace + 5.0
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def die_with_parent() -> None:
    """In a worker process that `weft up` started: end (SIGTERM, so it drains) when the parent does."""
    raw = os.environ.get(PARENT_ENV)
    if not raw:
        return
    try:
        parent = int(raw)
    except ValueError:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the line above: nobody would tell us
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:  # where PR_SET_PDEATHSIG is not: notice a new parent (the orphan reaper)
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
