"""Helpers shared by integration and e2e tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence


async def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def assert_applied_once(history: list[Any]) -> None:
    """No result applied twice: one outcome per (step, item, attempt), one finish."""
    outcomes = Counter(
        (e.step_id, e.item, e.attempt) for e in history if e.type in ("StepSucceeded", "StepFailed") and e.attempt > 0
    )
    twice = {k: n for k, n in outcomes.items() if n > 1}
    assert not twice, f"results applied more than once: {twice}"
    scheduled = Counter((e.step_id, e.item, e.attempt) for e in history if e.type == "StepScheduled")
    assert all(n == 1 for n in scheduled.values()), f"a task attempt was scheduled twice: {scheduled}"
    finishes = [e.type for e in history if e.type in ("ExecutionCompleted", "ExecutionFailed", "ExecutionCancelled")]
    assert len(finishes) <= 1 or "StepReprocessRequested" in {e.type for e in history}, finishes


class Running:
    """A whole stack running in this test's event loop (services.stack.run_services)."""

    def __init__(self, stack: Any, stop: asyncio.Event, task: asyncio.Task[None]):
        from services.orchestrator.executions import Executions

        self.stack, self.stop, self.task = stack, stop, task
        self.reader = Executions(stack.store)  # its own cache: the stack's runs in other threads

    def publish(self, text: str) -> Any:
        from contracts.definitions import parse_definition
        from services.orchestrator.registry import Registry

        return Registry(self.stack.store).publish(parse_definition(text))

    async def start(self, version: Any, data: Any = None, **kw: Any) -> str:
        state, _ = await asyncio.to_thread(self.stack.executions.start, version, data if data is not None else {}, **kw)
        return state.id

    async def finished(self, execution_id: str, timeout: float = 30) -> Any:
        async def done() -> Any:
            s = await asyncio.to_thread(self.reader.load, execution_id, fresh=True)
            return s if s.finished else None

        return await wait_until(done, timeout=timeout, what=f"execution {execution_id} to finish")

    async def history(self, execution_id: str) -> list[Any]:
        return await asyncio.to_thread(self.reader.history, execution_id)

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, timeout=30)


async def up_stack(tmp_path: Path, db_url: str, nats_url: str, parts: Sequence[str] | None = None,
                   **overrides: Any) -> Running:
    """Start the services (all of them unless `parts`) on a unique broker namespace."""
    from services.settings import Settings
    from services.stack import ALL, run_services

    settings = Settings(
        home=tmp_path, database_url=db_url, broker_url=nats_url,  # nats:// or kafka:// (tests/fixtures_kafka.py)
        namespace=overrides.pop("namespace", f"t{uuid.uuid4().hex[:8]}"),
        ack_wait=overrides.pop("ack_wait", 5.0), worker_concurrency=overrides.pop("concurrency", 8),
        poll_interval=0.02, step_modules=overrides.pop("step_modules", "tests,examples"), **overrides,
    )
    stop = asyncio.Event()
    ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_services(settings, parts or ALL, stop, on_ready=ready.set_result))
    done, _ = await asyncio.wait([ready, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    return Running(ready.result(), stop, task)


@asynccontextmanager
async def stack_up(tmp_path: Path, db_url: str, nats_url: str, parts: Sequence[str] | None = None,
                   **overrides: Any) -> AsyncIterator[Running]:
    running = await up_stack(tmp_path, db_url, nats_url, parts, **overrides)
    try:
        yield running
    finally:
        await running.close()


async def finished_all(store: Any, ids: Any, finishing: str, *, since: int = 0, timeout: float = 60,
                       interval: float = 0.1) -> None:
    """Wait until each execution of `ids` has its `finishing` event (ExecutionCompleted, ExecutionFailed)
    in the store, reading the log from position `since`."""
    wanted, seen, position = set(ids), set(), since
    deadline = time.monotonic() + timeout
    while len(seen) < len(wanted):
        records = await asyncio.to_thread(store.read, position, 5000, [finishing])
        seen.update(str(r.stream_id) for r in records if str(r.stream_id) in wanted)
        if records:
            position = records[-1].position
        else:
            assert time.monotonic() < deadline, f"only {len(seen)}/{len(wanted)} {finishing} after {timeout}s"
            await asyncio.sleep(interval)


class Background:
    """run_services in a thread of its own (with its own event loop), for synchronous tests
    that call the stack over real HTTP, e.g. through schemathesis or httpx.Client."""

    def __init__(self, settings: Any, parts: Sequence[str]):
        self.settings, self.parts = settings, tuple(parts)
        self.ready = threading.Event()
        self.stack: Any = None
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, name="background-stack", daemon=True)

    def _main(self) -> None:
        from services.stack import run_services

        async def main() -> None:
            self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()

            def up(stack: Any) -> None:
                self.stack = stack
                self.ready.set()

            await run_services(self.settings, self.parts, self.stop, on_ready=up)

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
            self.ready.set()

    def __enter__(self) -> Any:
        self.thread.start()
        assert self.ready.wait(60), "the stack did not start"
        if self.error is not None:
            raise self.error
        assert self.stack is not None
        return self.stack

    def __exit__(self, *exc: Any) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


# ---- services as real subprocesses (`python -m weft <service>`), for crash tests ------------

ROOT = Path(__file__).resolve().parents[1]


def service_env(home: Path, db_url: str, nats_url: str, prefix: str = "c") -> dict[str, str]:
    """The environment of a service subprocess: this test's store and broker, fast redelivery."""
    env = {
        **os.environ, "WEFT_HOME": str(home), "WEFT_DATABASE_URL": db_url, "WEFT_BROKER_URL": nats_url,
        "WEFT_NAMESPACE": f"{prefix}{uuid.uuid4().hex[:8]}", "WEFT_ACK_WAIT": "2", "WEFT_POLL_INTERVAL": "0.02",
        "WEFT_LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT), "WEFT_STEP_MODULES": "tests,examples",
    }
    env.pop("WEFT_CRASH_AT", None)
    return env


class Services:
    """Service subprocesses with their logs in `logs`; SIGTERM (then SIGKILL) on stop_all."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, key: str | None = None, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start `weft <name>`, known as `key` (default: the name) in `procs`; a process
        already under that key is waited for first, so none is left unreaped."""
        key = key or name
        old = self.procs.get(key)
        if old is not None and old.poll() is None:
            old.kill()
        if old is not None:
            old.wait()
        with open(self.logs / f"{key}-{len(list(self.logs.iterdir()))}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "weft", name], env={**self.env, **extra_env}, stdout=log,
                stderr=subprocess.STDOUT, cwd=ROOT,
            )
        self.procs[key] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def sigkilled(proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    """Wait for a process to reach its crash point: it must end by SIGKILL."""
    await wait_until(lambda: proc.poll() is not None, timeout=timeout, what="the crash point to be reached")
    assert proc.returncode == -signal.SIGKILL, f"expected SIGKILL, got {proc.returncode}"
