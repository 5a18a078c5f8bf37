"""Cost per event stays flat as an execution grows: no step of the orchestrator walks the whole
execution (all its tasks, or a copy of them) for each result.

These check what is done, not how long it takes: a result of one map item reads no other
task, and the result consumer's batch path works on the cached state in place.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from contracts.definitions import parse_definition
from contracts.messages import StepError, StepResult
from services.orchestrator.decide import Start, decide
from services.orchestrator.executions import Executions
from services.orchestrator.registry import Registry
from services.orchestrator.state import Execution, evolve
from services.store import open_store

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
ITEMS = 500
WF = parse_definition({"name": "big", "steps": [
    {"id": "a", "type": "noop"},
    {"id": "m", "type": "noop", "needs": ["a"], "map": "${{ steps.a.output }}",
     "retry": {"max_attempts": 3, "initial_delay": 1, "jitter": False}},
]})


class WatchedTasks(dict):  # type: ignore[type-arg]
    """The tasks of a step, counting every walk over all of them."""

    walks = 0

    def __iter__(self) -> Any:
        WatchedTasks.walks += 1
        return super().__iter__()

    def values(self) -> Any:
        WatchedTasks.walks += 1
        return super().values()

    def items(self) -> Any:
        WatchedTasks.walks += 1
        return super().items()


def result(step: str, item: int | None, status: str = "succeeded", attempt: int = 1, output: Any = None) -> StepResult:
    error = StepError(type="Boom", message="boom") if status == "failed" else None
    return StepResult(execution_id="ex", step_id=step, item=item, attempt=attempt, status=status,  # type: ignore[arg-type]
                      output=output, error=error)


def apply(state: Execution, command: Any) -> list[Any]:
    events = decide(state, command, NOW)
    for e in events:
        evolve(state, e)
    return events


def mapped_execution() -> Execution:
    state = Execution(id="ex")
    apply(state, Start(WF, 1, WF.content_hash(), input=None))
    apply(state, result("a", None, output=list(range(ITEMS))))
    assert len(state.steps["m"].tasks) == ITEMS
    return state


def test_a_map_items_result_reads_no_other_task() -> None:
    state = mapped_execution()
    state.steps["m"].tasks = WatchedTasks(state.steps["m"].tasks)
    WatchedTasks.walks = 0
    for item in range(ITEMS - 1):
        events = decide(state, result("m", item), NOW)  # decide copies the state: its own walk
        for e in events:
            evolve(state, e)
    walks_per_decide = 1  # the copy decide() makes of its input, and nothing more
    assert WatchedTasks.walks <= (ITEMS - 1) * walks_per_decide
    state.steps["m"].tasks = dict(state.steps["m"].tasks)


def test_a_failed_item_is_retried_and_the_map_still_gathers_in_order() -> None:
    state = mapped_execution()
    for item in range(1, ITEMS):
        apply(state, result("m", item, output=item))
    events = apply(state, result("m", 0, "failed"))
    assert [e.type for e in events] == ["StepFailed", "StepScheduled"]
    assert state.attention == set()  # the retry is scheduled: nothing waits for an attempt
    events = apply(state, result("m", 0, attempt=2, output=0))
    assert events[-1].type == "ExecutionCompleted"
    assert state.steps["m"].output == list(range(ITEMS))
    assert state.steps["m"].succeeded == ITEMS


def test_the_result_consumer_works_on_the_cached_state_in_place(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'weft.db'}")
    try:
        version = Registry(store).publish(WF)
        executions = Executions(store)
        state, _ = executions.start(version, None, execution_id="00000000-0000-4000-8000-000000000001")
        eid = state.id
        executions.apply_results([result("a", None, output=list(range(ITEMS))).model_copy(update={"execution_id": eid})])
        cached = executions._get(eid)
        assert cached is not None and len(cached.steps["m"].tasks) == ITEMS
        for chunk in range(0, 50, 10):
            batch = [result("m", i, output=i).model_copy(update={"execution_id": eid}) for i in range(chunk, chunk + 10)]
            outcomes = executions.apply_results(batch)
            assert {o.status for o in outcomes} == {"applied"}
            assert executions._get(eid) is cached, "the batch path copied the execution's state"
        # What is cached is what the store holds.
        assert executions.load(eid, fresh=True) == cached
        # A reader gets a copy of its own, and cannot put an older state back over a newer one.
        old = executions.load(eid)
        outcomes = executions.apply_results([result("m", 50, output=50).model_copy(update={"execution_id": eid})])
        assert [o.status for o in outcomes] == ["applied"]
        executions._remember(old)
        assert executions._get(eid).version == old.version + 1
    finally:
        store.close()


def test_the_result_consumer_keeps_no_finished_execution_cached(tmp_path: Path) -> None:
    """What is cached per execution follows the executions in flight: one that finishes is dropped."""
    store = open_store(f"sqlite:///{tmp_path / 'weft.db'}")
    try:
        version = Registry(store).publish(parse_definition({"name": "one", "steps": [{"id": "a", "type": "noop"}]}))
        executions = Executions(store)
        ids = [executions.start(version, None)[0].id for _ in range(20)]
        assert all(executions._get(eid) is not None for eid in ids)
        outcomes = executions.apply_results([
            StepResult(execution_id=eid, step_id="a", attempt=1, status="succeeded") for eid in ids])
        assert {o.status for o in outcomes} == {"applied"}
        assert all(executions._get(eid) is None for eid in ids)
        assert executions.load(ids[0]).status == "completed"  # read back from the store
    finally:
        store.close()
