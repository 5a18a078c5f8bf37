"""Helpers shared by integration and e2e tests."""

from __future__ import annotations

import asyncio
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
        home=tmp_path, database_url=db_url, nats_url=nats_url,
        namespace=overrides.pop("namespace", f"t{uuid.uuid4().hex[:8]}"),
        ack_wait=overrides.pop("ack_wait", 5.0), worker_concurrency=overrides.pop("concurrency", 8),
        poll_interval=0.02, **overrides,
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
