"""Drive executions through the real core and store, playing the worker's part.

For tests that need many real histories fast (projections, rebuild races, crash
tests) without a broker: each round hands every scheduled task of the given
executions to a `behaviour`, turns its answers into StepResults and applies them
with `Executions.apply_results`, exactly as the result consumer does.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable

from contracts.messages import StepError, StepResult
from services.orchestrator.executions import Executions
from services.orchestrator.state import Execution, Task

# (state, step_id, item, task) -> ("succeeded", output) | ("failed", StepError) | None (no answer yet)
Behaviour = Callable[[Execution, str, "int | None", Task], "tuple[str, Any] | None"]


def echo(state: Execution, step_id: str, item: int | None, task: Task) -> tuple[str, Any]:
    """Succeed with what the step was given, tagged with the step id."""
    return "succeeded", {"step": step_id, "item": item, "input": task.input}


def flaky(every: int = 3) -> Behaviour:
    """Echo, but the first attempt of every `every`-th task fails (then the retry succeeds)."""
    counter = {"n": 0}

    def behaviour(state: Execution, step_id: str, item: int | None, task: Task) -> tuple[str, Any]:
        counter["n"] += 1
        if task.attempt == 1 and counter["n"] % every == 0:
            return "failed", StepError(type="ConnectionError", message=f"{step_id} timed out")
        return echo(state, step_id, item, task)

    return behaviour


class Clock:
    """A deterministic clock that moves on by `tick` each time it is read."""

    def __init__(self, start: datetime | None = None, tick: float = 0.01):
        self.now = start or datetime(2025, 1, 1, tzinfo=timezone.utc)
        self.tick = timedelta(seconds=tick)

    def __call__(self) -> datetime:
        self.now += self.tick
        return self.now


class Driver:
    def __init__(self, executions: Executions, worker_id: str = "sim-worker"):
        self.executions = executions
        self.worker_id = worker_id

    def pending(self, state: Execution, late: bool = False) -> list[tuple[str, int | None, Task]]:
        """Tasks waiting for a result; with `late`, also those of a finished or paused execution."""
        if state.status != "running" and not late:
            return []
        return [
            (sid, item, task)
            for sid, step in state.steps.items()
            for item, task in step.tasks.items()
            if task.status == "scheduled" and task.attempt not in task.finished
        ]

    def round(self, ids: Iterable[str], behaviour: Behaviour = echo, *, late: bool = False) -> list[str]:
        """Answer every scheduled task of these executions once; returns those still running."""
        results, running = [], []
        for eid in ids:
            state = self.executions.load(eid)
            todo = self.pending(state, late)
            if not todo:
                continue
            running.append(eid)
            for sid, item, task in todo:
                answer = behaviour(state, sid, item, task)
                if answer is None:
                    continue
                status, value = answer
                now = self.executions.clock()
                results.append(StepResult(
                    execution_id=eid, step_id=sid, item=item, attempt=task.attempt, status=status,
                    output=value if status == "succeeded" else None,
                    error=value if status == "failed" else None, worker_id=self.worker_id,
                    started_at=now, finished_at=now + timedelta(milliseconds=5 + (len(sid) * 7) % 40),
                ))
        if results:
            self.executions.apply_results(results)
        return running

    def run(self, ids: Iterable[str], behaviour: Behaviour = echo, max_rounds: int = 200) -> None:
        ids = list(ids)
        for _ in range(max_rounds):
            ids = self.round(ids, behaviour)
            if not ids:
                return
        raise AssertionError(f"executions still running after {max_rounds} rounds: {ids[:5]}")


# ---- a mixed history: every kind of event an execution can have --------------------------------

MIX_WORKFLOWS = {
    "shapes": """
name: shapes
input_schema: {type: object, required: [n]}
steps:
  - {id: a, type: noop}
  - {id: b, type: noop, needs: [a], map: "${{ input.items }}"}
  - {id: c, type: noop, needs: [a], when: "${{ input.flag }}"}
  - {id: d, type: noop, needs: [b, c], retry: {max_attempts: 2, initial_delay: 0}}
output: {b: "${{ steps.b.output }}", d: "${{ steps.d.output }}"}
""",
    "linear": """
name: linear
steps:
  - {id: one, type: noop}
  - {id: two, type: noop, needs: [one]}
  - {id: three, type: noop, needs: [two]}
""",
}


def refuse_d(state: Execution, step_id: str, item: int | None, task: Task) -> tuple[str, Any] | None:
    """Step d fails for good (non-retryable) when the input says so; everything else echoes."""
    fixed = isinstance(task.input, dict) and task.input.get("fixed")  # a reprocess patched it in
    if step_id == "d" and (state.input or {}).get("fail") and not fixed:
        return "failed", StepError(type="PaymentDeclined", message="card declined", non_retryable=True)
    return echo(state, step_id, item, task)


def seed_mix(executions: Executions, count: int = 24, *, prefix: str = "") -> dict[str, list[str]]:
    """Start and drive `count` executions of every kind; returns ids by kind.

    Kinds: completed (with map, skip and retries), failed (dead-lettered),
    reprocessed (failed, then its dead letter reprocessed with a patch),
    retried (failed, then Retry), cancelled (results then ignored), paused,
    running (left mid-way), replayed (a replay from a step: reused outputs).
    """
    from contracts.definitions import parse_definition
    from services.orchestrator.decide import Cancel, Pause, Reprocess, Retry
    from services.orchestrator.registry import Registry

    reg = Registry(executions.store)
    shapes = reg.publish(parse_definition(MIX_WORKFLOWS["shapes"]))
    linear = reg.publish(parse_definition(MIX_WORKFLOWS["linear"]))
    driver = Driver(executions)
    kinds: dict[str, list[str]] = {k: [] for k in (
        "completed", "failed", "reprocessed", "retried", "cancelled", "paused", "running", "replayed", "linear")}
    for i in range(count):
        kind = list(kinds)[i % len(kinds)]
        fail = kind in ("failed", "reprocessed", "retried")
        data = {"n": i, "items": list(range(i % 4)), "flag": i % 3 != 0, "fail": fail}
        if kind == "linear":
            eid = executions.start(linear, {"n": i})[0].id
            driver.run([eid], flaky(2))
        elif kind == "replayed":
            source = executions.start(shapes, data)[0].id
            driver.run([source], echo)
            src = executions.load(source)
            reused = {"a": src.steps["a"].output, "b": src.steps["b"].output}
            eid = executions.start(shapes, data, replay_of=source, reused=reused)[0].id
            driver.run([eid], echo)
            kinds["completed"].append(source)
        else:
            eid = executions.start(shapes, data)[0].id
            if kind == "running":
                driver.round([eid], echo)
            elif kind == "cancelled":
                driver.round([eid], echo)
                executions.command(eid, Cancel(why="test"))
                driver.round([eid], echo, late=True)  # results of attempts in flight: ignored
            elif kind == "paused":
                executions.command(eid, Pause())
                driver.round([eid], echo)
            else:
                driver.run([eid], flaky(4) if kind == "completed" else refuse_d)
                if kind == "reprocessed":
                    executions.command(eid, Reprocess(step_id="d", patch={"fixed": True}))
                    driver.run([eid], refuse_d)
                elif kind == "retried":
                    executions.command(eid, Retry())
                    driver.run([eid], lambda s, sid, item, t: echo(s, sid, item, t))
        kinds[kind].append(eid)
    return kinds
