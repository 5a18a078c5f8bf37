"""Helpers shared by integration and e2e tests."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Awaitable, Callable


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
