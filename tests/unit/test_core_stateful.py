"""Stateful property test of the pure core: decide/evolve/fold under a hostile broker.

Results come back in any order, twice, late, for old attempts; the orchestrator
crashes and rebuilds its state from the history; users cancel, pause, resume,
retry and reprocess at any moment. After every step the guarantees of DESIGN.md
must hold, and at the end every execution must still be able to finish.

`WEFT_HYPOTHESIS_EXAMPLES` sets the number of examples (CI: 500).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from contracts.definitions import WorkflowDef, parse_definition
from contracts.messages import StepError, StepResult
from services.orchestrator.decide import Cancel, DecisionError, Pause, Reprocess, Resume, Retry, Start, decide
from services.orchestrator.state import Execution, evolve, fold

EXAMPLES = int(os.environ.get("WEFT_HYPOTHESIS_EXAMPLES", "100"))
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
EID = "ex-stateful"
RETRY = {"max_attempts": 2, "initial_delay": 0.5, "max_delay": 4, "multiplier": 2, "jitter": True, "non_retryable": ["Fatal"]}
DONE = ("succeeded", "skipped")


def _steps(*steps: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "noop", "retry": RETRY, **s} for s in steps]


# Each shape: its steps, and what a successful step outputs given a small number n
# (a list for a step others map over, an object with `go` for a step a `when` reads).
SHAPES: dict[str, tuple[list[dict[str, Any]], dict[str, str]]] = {
    "linear": (_steps({"id": "a"}, {"id": "b", "needs": ["a"]}, {"id": "c", "needs": ["b"]}), {}),
    "diamond": (
        _steps({"id": "a"}, {"id": "b", "needs": ["a"]}, {"id": "c", "needs": ["a"]}, {"id": "d", "needs": ["b", "c"]}),
        {},
    ),
    "map": (
        _steps(
            {"id": "a"},
            {"id": "m", "needs": ["a"], "map": "${{ steps.a.output }}", "input": {"v": "${{ item }}"}},
            {"id": "z", "needs": ["m"], "input": "${{ steps.m.output }}"},
        ),
        {"a": "list"},
    ),
    "when-skip": (
        _steps(
            {"id": "a"},
            {"id": "b", "needs": ["a"], "when": "${{ steps.a.output.go }}"},
            {"id": "c", "needs": ["b"]},
            {"id": "d", "needs": ["a", "c"]},
        ),
        {"a": "go"},
    ),
}


@st.composite
def generated_dags(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A random DAG over 1-5 steps: random needs, `when`s and `map`s read from the input,
    and inputs that fail at schedule time when a parent's output is not a number."""
    n = draw(st.integers(1, 5))
    steps: list[dict[str, Any]] = []
    flags: dict[str, bool] = {}
    lists: dict[str, list[int]] = {}
    for i in range(n):
        sid = f"s{i}"
        step: dict[str, Any] = {"id": sid}
        if i:
            step["needs"] = sorted(draw(st.sets(st.sampled_from([f"s{j}" for j in range(i)]), max_size=2)))
        if draw(st.booleans()):
            flags[sid] = draw(st.booleans())
            step["when"] = f"${{{{ input.flags.{sid} }}}}"
        if draw(st.integers(0, 3)) == 0:
            lists[sid] = list(range(draw(st.integers(0, 3))))
            step["map"] = f"${{{{ input.lists.{sid} }}}}"
        if step.get("needs") and draw(st.integers(0, 3)) == 0:
            step["input"] = {"n": f"${{{{ abs(steps.{step['needs'][0]}.output.n) }}}}"}
        steps.append(step)
    return _steps(*steps), {"flags": flags, "lists": lists}


def _task(e: Any) -> tuple[str, int | None, int]:
    return (e.step_id, e.item, e.attempt)


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.wf: WorkflowDef | None = None
        self.outputs: dict[str, str] = {}
        self.state = Execution(id=EID)
        self.history: list[Any] = []
        self.clock = T0
        self.pending: list[tuple[str, int | None, int]] = []  # scheduled, no result sent yet
        self.delivered: list[StepResult] = []  # results sent at least once
        self.accepted: set[tuple[str, int | None, int]] = set()
        self.scheduled: dict[tuple[str, int | None], int] = {}  # task -> last scheduled attempt

    # ---- driving -------------------------------------------------------------------------

    def run(self, command: Any) -> list[Any]:
        self.clock += timedelta(seconds=1)
        before = self.state.copy()
        was_finished = self.state.finished
        try:
            events = decide(self.state, command, self.clock)
        except DecisionError:
            assert self.state == before
            assert not isinstance(command, StepResult), "a result for a scheduled task must be decidable"
            return []
        assert self.state == before, "decide mutated its input"
        if was_finished and not isinstance(command, (Retry, Reprocess)):
            # a finished execution only changes through an explicit user act
            assert all(e.type == "StepResultIgnored" for e in events), [e.type for e in events]
        if was_finished and events and isinstance(command, (Retry, Reprocess)):
            assert events[0].type in ("ExecutionRetried", "StepReprocessRequested")
        for e in events:
            self.check_event(e)
            evolve(self.state, e)
            self.history.append(e)
        if any(e.type == "StepDeadLettered" for e in events):
            assert self.state.status == "failed", "a dead letter fails its execution"
        assert self.state.version == len(self.history)
        assert self.state.version == before.version + len(events)
        return events

    def check_event(self, e: Any) -> None:
        """Checked against the state just before the event is folded in."""
        assert self.wf is not None
        kind = e.type
        if kind in ("StepScheduled", "StepMapped", "StepSkipped", "StepDeadLettered"):
            for parent in self.wf.step(e.step_id).needs:
                assert self.state.steps[parent].status in DONE, f"{e.step_id} {kind} while {parent} is {self.state.steps[parent].status}"
        if kind == "StepScheduled":
            key = (e.step_id, e.item)
            assert e.attempt == self.scheduled.get(key, 0) + 1, f"attempts of {key} must count up by one"
            assert e.idempotency_key == (f"{EID}:{e.step_id}" if e.item is None else f"{EID}:{e.step_id}#{e.item}")
            assert self.state.status == "running"
            self.scheduled[key] = e.attempt
            self.pending.append(_task(e))
        elif kind in ("StepSucceeded", "StepFailed") and e.attempt > 0:
            assert _task(e) not in self.accepted, f"second result accepted for {_task(e)}"
            self.accepted.add(_task(e))
        elif kind == "StepSucceeded" and e.item is None and e.reused_from is None:
            step = self.state.steps[e.step_id]
            assert step.count is not None and len(e.output) == step.count
        elif kind == "StepResultIgnored":
            assert _task(e) not in self.accepted

    def output_for(self, step_id: str, n: int) -> Any:
        kind = self.outputs.get(step_id)
        if kind == "list":
            return [f"i{k}" for k in range(n % 4)]
        if kind == "go":
            return {"go": n % 2 == 0}
        return {"n": n if n < 7 else "seven"}  # "seven" breaks `abs(...)` inputs downstream

    def send(self, task: tuple[str, int | None, int], ok: bool, n: int, fatal: bool = False) -> list[Any]:
        step_id, item, attempt = task
        if ok:
            r = StepResult(execution_id=EID, step_id=step_id, item=item, attempt=attempt, status="succeeded", output=self.output_for(step_id, n))
        else:
            error = StepError(type="Fatal" if fatal else "Boom", message=f"failure {n}", non_retryable=fatal and n % 2 == 0)
            r = StepResult(execution_id=EID, step_id=step_id, item=item, attempt=attempt, status="failed", error=error)
        self.delivered.append(r)
        return self.run(r)

    # ---- rules ---------------------------------------------------------------------------

    @initialize(
        shape=st.sampled_from([*SHAPES, "generated"]),
        generated=generated_dags(),
        reuse=st.sampled_from([0, 0, 0, 1, 2, 3]),
    )
    def start(self, shape: str, generated: tuple[list[dict[str, Any]], dict[str, Any]], reuse: int) -> None:
        """Start a run; sometimes a replay that keeps the outputs of the first `reuse` steps
        (steps are listed parents first, so any prefix is closed under `needs`)."""
        if shape == "generated":
            steps, inp = generated
            self.outputs = {}
        else:
            steps, self.outputs = SHAPES[shape]
            inp = {"shape": shape}
        self.wf = parse_definition({"name": f"wf-{shape}", "steps": steps, "output": "${{ input }}"})
        event(f"shape: {shape}")
        reused = {step["id"]: self.output_for(step["id"], 2) for step in steps[:reuse]}
        start = Start(self.wf, 1, self.wf.content_hash(), input=inp, replay_of="ex-old" if reused else None, reused=reused)
        events = self.run(start)
        assert events[0].type == "ExecutionStarted"
        kept = [e.step_id for e in events if e.type == "StepSucceeded" and e.reused_from == "ex-old"]
        assert kept == list(reused)
        assert self.run(start) == []

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 50), ok=st.booleans(), n=st.integers(0, 7), fatal=st.booleans())
    def deliver(self, pick: int, ok: bool, n: int, fatal: bool) -> None:
        """A result for any task with no result yet: results arrive in any order."""
        task = self.pending.pop(pick % len(self.pending))
        finished = self.state.finished
        events = self.send(task, ok, n, fatal)
        if finished:
            event("result after the execution finished")
            assert [e.type for e in events] == ["StepResultIgnored"]
            assert events[0].reason == f"execution {self.state.status}"
        else:
            assert events and events[0].type in ("StepSucceeded", "StepFailed"), [e.type for e in events]

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 50), n=st.integers(0, 7))
    def deliver_success(self, pick: int, n: int) -> None:
        """Successes, more often than failures, so executions get somewhere."""
        self.send(self.pending.pop(pick % len(self.pending)), True, n)

    @precondition(lambda self: self.delivered)
    @rule(pick=st.integers(0, 50), flip=st.booleans())
    def duplicate(self, pick: int, flip: bool) -> None:
        """Redelivery of a result already sent (maybe with the other outcome): no events."""
        r = self.delivered[pick % len(self.delivered)]
        if flip:
            status = "failed" if r.status == "succeeded" else "succeeded"
            error = StepError(type="Boom", message="flipped") if status == "failed" else None
            r = r.model_copy(update={"status": status, "error": error, "output": None})
        assert self.run(r) == []

    @precondition(lambda self: any(a > 1 for a in self.scheduled.values()))
    @rule(pick=st.integers(0, 50), ok=st.booleans())
    def stale(self, pick: int, ok: bool) -> None:
        """A result for an older attempt of a task that has a newer one."""
        retried = sorted((k, a) for k, a in self.scheduled.items() if a > 1)
        (step_id, item), attempt = retried[pick % len(retried)]
        old = 1 + pick % (attempt - 1)
        error = None if ok else StepError(type="Boom", message="old")
        r = StepResult(execution_id=EID, step_id=step_id, item=item, attempt=old, status="succeeded" if ok else "failed", error=error)
        events = self.run(r)
        assert all(e.type == "StepResultIgnored" for e in events)

    @rule()
    def crash(self) -> None:
        """The orchestrator dies; its successor folds the stored history."""
        self.state = fold(EID, self.history)

    @rule(
        kind=st.sampled_from(["pause"] * 3 + ["resume"] * 3 + ["retry"] * 2 + ["reprocess"] * 3 + ["cancel"]),
        pick=st.integers(0, 50),
    )
    def control(self, kind: str, pick: int) -> None:
        """A user command at any moment, often on a status it does not apply to."""
        getattr(self, f"do_{kind}")(pick)

    @precondition(lambda self: self.state.status == "failed")
    @rule()
    def retry(self) -> None:
        self.do_retry(0)

    @precondition(lambda self: any(s.status == "dead_lettered" for s in self.state.steps.values()))
    @rule(pick=st.integers(0, 50))
    def reprocess(self, pick: int) -> None:
        dead = [sid for sid, s in self.state.steps.items() if s.status == "dead_lettered"]
        self.do_reprocess(pick, dead[pick % len(dead)])

    def do_cancel(self, pick: int) -> None:
        finished = self.state.finished
        events = self.run(Cancel(why="ops" if pick % 2 else None))
        assert [e.type for e in events] == ([] if finished else ["ExecutionCancelled"])

    def do_pause(self, pick: int) -> None:
        status = self.state.status
        events = self.run(Pause())
        assert [e.type for e in events] == (["ExecutionPaused"] if status == "running" else [])

    def do_resume(self, pick: int) -> None:
        status = self.state.status
        events = self.run(Resume())
        assert bool(events) == (status == "paused")
        if events:
            assert events[0].type == "ExecutionResumed"

    def do_retry(self, pick: int) -> None:
        status = self.state.status
        events = self.run(Retry())
        assert bool(events) == (status == "failed")
        if events:
            event("retried a failed execution")
            assert events[0].type == "ExecutionRetried"

    def do_reprocess(self, pick: int, step_id: str | None = None) -> None:
        assert self.wf is not None
        step_id = step_id or self.wf.steps[pick % len(self.wf.steps)].id
        dead = sorted((k for k, t in self.state.steps[step_id].tasks.items() if t.status == "dead_lettered"), key=str)
        item = dead[0] if dead else None
        patch = [None, {"fixed": True}, {"v": None}][pick % 3]
        status = self.state.status
        events = self.run(Reprocess(step_id, item=item, patch=patch))
        if events:
            event("reprocessed a dead letter")
            assert status != "cancelled"
            assert events[0].type == "StepReprocessRequested" and self.state.status in ("running", "failed", "paused")
            if self.state.steps[step_id].status != "dead_lettered":  # not dead again at once (bad input)
                # a second request for the same dead letter makes no second attempt
                assert self.run(Reprocess(step_id, item=item, patch=patch)) == []

    # ---- invariants ----------------------------------------------------------------------

    @invariant()
    def history_rebuilds_the_live_state(self) -> None:
        assert fold(EID, self.history) == self.state
        assert self.state.version == len(self.history)

    @invariant()
    def kept_counts_match_the_tasks(self) -> None:
        """What evolve keeps so that a result is decided without walking every task."""
        wanting = {(sid, item) for sid, step in self.state.steps.items() for item, t in step.tasks.items()
                   if t.status in ("failed", "reprocess") or t.orphaned()}
        assert self.state.attention == wanting
        for step in self.state.steps.values():
            assert step.succeeded == sum(1 for t in step.tasks.values() if t.status == "succeeded")

    @invariant()
    def finished_has_its_event(self) -> None:
        if self.state.finished:
            last = [e for e in self.history if e.type in ("ExecutionCompleted", "ExecutionFailed", "ExecutionCancelled")]
            assert last and last[-1].type == {"completed": "ExecutionCompleted", "failed": "ExecutionFailed", "cancelled": "ExecutionCancelled"}[self.state.status]

    @invariant()
    def step_statuses_follow_the_dag(self) -> None:
        if self.wf is None:
            return
        for step_def in self.wf.steps:
            status = self.state.steps[step_def.id].status
            if status in ("scheduled", "succeeded", "dead_lettered") or (status == "skipped" and step_def.needs):
                assert all(self.state.steps[p].status in DONE for p in step_def.needs)
        if self.state.status == "completed":
            assert all(s.status in DONE for s in self.state.steps.values())

    def teardown(self) -> None:
        """Liveness: from wherever we are, resuming, retrying and succeeding finishes the run."""
        if self.wf is None:
            return
        event(f"status before the end: {self.state.status}")
        for _ in range(200):
            if self.state.status in ("completed", "cancelled"):
                return
            if self.state.status == "failed" and self.state.error and self.state.error[1] == "ExpressionError":
                event("failed on a recorded output that breaks an expression")
                return  # the parent's recorded output stays; no retry can change it
            if self.state.status == "paused":
                self.run(Resume())
            elif self.state.status == "failed":
                assert self.run(Retry()), "a failed execution must be retryable"
            elif self.pending:
                self.send(self.pending.pop(0), True, 1)
            else:
                raise AssertionError(f"stuck: {self.state.status} with nothing in flight: {self.state.steps}")
        raise AssertionError("did not finish")


CoreMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
)
TestCore = CoreMachine.TestCase
