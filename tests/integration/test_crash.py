"""Crashes are normal: SIGKILL each service at its worst moment, restart it, and
check that every execution completes and no result is applied twice.

The services run as real subprocesses (`python -m weft <service>`) over a real
NATS and PostgreSQL. `WEFT_CRASH_AT` kills a process at a named line (see
services/faults.py); the worker is also killed from outside in the middle of a step.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from contracts.definitions import parse_definition
from services.orchestrator.executions import Executions
from services.orchestrator.registry import Registry
from services.store import open_store
from tests.support import Services, assert_applied_once, service_env, sigkilled, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

WORKFLOW = """
name: crashy
steps:
  - {id: a, type: noop}
  - {id: b, type: sleep, needs: [a], with: {seconds: 0.3}}
  - {id: c, type: transform, needs: [b], map: "${{ input.items }}", with: {expression: "@"}}
  - {id: d, type: noop, needs: [c]}
output: "${{ steps.c.output }}"
"""


@pytest.fixture
def services(tmp_path: Path, pg_url: str, broker_url: str):
    svc = Services(service_env(tmp_path, pg_url, broker_url), tmp_path / "logs")
    yield svc
    svc.stop_all()


def _start_executions(url: str, count: int) -> tuple[Executions, list[str]]:
    store = open_store(url)
    version = Registry(store).publish(parse_definition(WORKFLOW))
    executions = Executions(store)
    ids = [executions.start(version, {"items": [i, i + 1, i + 2]})[0].id for i in range(count)]
    return executions, ids


async def _all_complete(executions: Executions, ids: list[str], timeout: float = 90) -> None:
    async def done() -> bool:
        states = await asyncio.to_thread(lambda: [executions.load(i, fresh=True) for i in ids])
        return all(s.status == "completed" for s in states)

    await wait_until(done, timeout=timeout, interval=0.25, what="every execution to complete")
    for i, eid in enumerate(ids):
        history = executions.history(eid)
        assert_applied_once(history)
        assert history[-1].type == "ExecutionCompleted"
        assert history[-1].output == [i, i + 1, i + 2]


@pytest.mark.parametrize("victim,point", [
    ("orchestrator", "orchestrator.after_append:3"),  # between the store commit and the acks
    ("relay", "relay.after_publish:2"),  # between the publishes and saving the position
    ("worker", "worker.after_publish:4"),  # between publishing a result and acking the command
])
async def test_sigkill_at_crash_point(services: Services, pg_url: str, victim: str, point: str) -> None:
    executions, ids = _start_executions(pg_url, 12)
    for name in ("orchestrator", "relay", "worker"):
        services.start(name, **({"WEFT_CRASH_AT": point} if name == victim else {}))
    await sigkilled(services.procs[victim])
    services.start(victim)  # the restart, without the crash point
    await _all_complete(executions, ids)
    executions.store.close()


async def test_worker_sigkilled_in_the_middle_of_a_step(services: Services, pg_url: str) -> None:
    executions, ids = _start_executions(pg_url, 8)
    for name in ("orchestrator", "relay", "worker"):
        services.start(name)

    def sleeping() -> bool:  # the sleep step has been handed to the worker and not finished
        states = [executions.load(i, fresh=True) for i in ids]
        return any(s.steps["b"].status == "scheduled" for s in states)

    await wait_until(sleeping, timeout=30)
    services.procs["worker"].kill()
    services.procs["worker"].wait()
    services.start("worker")
    await _all_complete(executions, ids)
    executions.store.close()
