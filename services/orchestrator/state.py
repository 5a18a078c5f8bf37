"""Execution state and `evolve`: fold one event into the state. Pure, no I/O.

`evolve` updates the state it is given and returns it: the state is owned by
whoever folds the history (a loader, or `decide` working on its own clone),
which keeps loading a long history linear instead of copying per event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from contracts.definitions import WorkflowDef

RUNNING, PAUSED, COMPLETED, FAILED, CANCELLED = "running", "paused", "completed", "failed", "cancelled"
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})

# task statuses: pending, scheduled, failed (awaiting its retry), reprocess (a user asked
# for a new attempt), succeeded, dead_lettered
# step statuses: pending, scheduled, succeeded, skipped, dead_lettered


@dataclass(slots=True)
class Task:
    attempt: int = 0
    status: str = "pending"
    input: Any = None
    output: Any = None
    finished: set[int] = field(default_factory=set)  # attempts whose result is recorded
    budget_from: int = 0  # attempts up to here do not count against the retry policy
    next_retry_delay: float | None = None
    patch: dict[str, Any] | None = None
    error: tuple[str, str] | None = None
    worker_id: str | None = None
    config: dict[str, Any] | None = None  # the rendered `with:` of the last attempt, for its retries

    def orphaned(self) -> bool:
        """Scheduled, but its result was ignored because the execution had finished."""
        return self.status == "scheduled" and self.attempt in self.finished

    def copy(self) -> Task:
        return Task(
            self.attempt, self.status, self.input, self.output, set(self.finished),
            self.budget_from, self.next_retry_delay, self.patch, self.error, self.worker_id, self.config,
        )


@dataclass(slots=True)
class Step:
    status: str = "pending"
    count: int | None = None  # number of items of a map step, once expanded
    tasks: dict[int | None, Task] = field(default_factory=dict)
    output: Any = None
    reused_from: str | None = None
    skip_reason: str | None = None
    # How many of `tasks` have succeeded: a map step of n items is done when this reaches n,
    # known without walking the tasks on every result (that was O(items) per result).
    succeeded: int = 0

    def copy(self) -> Step:
        tasks = {k: t.copy() for k, t in self.tasks.items()}
        return Step(self.status, self.count, tasks, self.output, self.reused_from, self.skip_reason, self.succeeded)


@dataclass(slots=True)
class Execution:
    id: str
    version: int = 0  # number of events folded in; the next event is version + 1
    status: str = "new"
    workflow: str = ""
    workflow_version: int = 0
    content_hash: str = ""
    definition: WorkflowDef | None = None
    input: Any = None
    steps: dict[str, Step] = field(default_factory=dict)
    output: Any = None
    error: tuple[str | None, str, str] | None = None  # (step, type, message)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    replay_of: str | None = None
    trigger: dict[str, Any] | None = None
    trace_id: str | None = None
    # (step, item) of the tasks that want a new attempt: failed (awaiting a retry), asked to be
    # reprocessed, or orphaned. Kept by evolve so that deciding on a result looks at these
    # few instead of every task of the execution (a map of 10,000 items made that O(history)).
    attention: set[tuple[str, int | None]] = field(default_factory=set)

    def copy(self) -> Execution:
        steps = {k: s.copy() for k, s in self.steps.items()}
        return Execution(
            self.id, self.version, self.status, self.workflow, self.workflow_version,
            self.content_hash, self.definition, self.input, steps, self.output, self.error,
            self.started_at, self.finished_at, self.replay_of, self.trigger, self.trace_id, set(self.attention),
        )

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


_definitions: dict[str, tuple[dict[str, Any], WorkflowDef]] = {}


def _definition(content_hash: str, raw: dict[str, Any]) -> WorkflowDef:
    # A memo, not state: the same hash always parses to the same immutable definition.
    # The body is compared too: a caller's wrong hash must not run another definition.
    hit = _definitions.get(content_hash)
    if hit is not None and hit[0] == raw:
        return hit[1]
    wf = WorkflowDef.model_validate(raw)
    if len(_definitions) > 10_000:
        _definitions.clear()
    _definitions[content_hash] = (raw, wf)
    return wf


def evolve(s: Execution, e: Any) -> Execution:
    s.version += 1
    kind = e.type
    if kind == "ExecutionStarted":
        s.status = RUNNING
        s.workflow, s.workflow_version, s.content_hash = e.workflow, e.version, e.content_hash
        s.definition = _definition(e.content_hash, e.definition)
        s.input, s.started_at, s.replay_of, s.trigger, s.trace_id = (
            e.input, e.at, e.replay_of, e.trigger, e.trace_id
        )
        s.steps = {step.id: Step() for step in s.definition.steps}
    elif kind == "StepMapped":
        step = s.steps[e.step_id]
        step.count, step.status = e.count, "scheduled"
    elif kind == "StepScheduled":
        step = s.steps[e.step_id]
        task = step.tasks.get(e.item)
        if task is None:
            task = step.tasks[e.item] = Task()
        task.attempt, task.input, task.patch = e.attempt, e.input, None
        _set(s, e.step_id, step, e.item, task, "scheduled")
        task.config = e.config
        task.next_retry_delay = None
        if step.status in ("pending", "dead_lettered"):
            step.status = "scheduled"
    elif kind == "StepSucceeded":
        step = s.steps[e.step_id]
        if e.item is None and (step.count is not None or e.reused_from):
            step.status, step.output, step.reused_from = "succeeded", e.output, e.reused_from
            return s
        task = step.tasks.setdefault(e.item, Task(attempt=e.attempt))
        task.output, task.worker_id = e.output, e.worker_id
        task.finished.add(e.attempt)
        _set(s, e.step_id, step, e.item, task, "succeeded")
        if e.item is None:
            step.status, step.output = "succeeded", e.output
    elif kind == "StepFailed":
        step = s.steps[e.step_id]
        task = step.tasks[e.item]
        task.error, task.worker_id = (e.error_type, e.error_message), e.worker_id
        task.next_retry_delay = e.next_retry_delay
        task.finished.add(e.attempt)
        _set(s, e.step_id, step, e.item, task, "failed")
    elif kind == "StepDeadLettered":
        step = s.steps[e.step_id]
        step.status = "dead_lettered"
        task = step.tasks.get(e.item)
        if task is not None:
            task.error = (e.error_type, e.error_message)
            task.finished.add(e.attempt)
            _set(s, e.step_id, step, e.item, task, "dead_lettered")
    elif kind == "StepSkipped":
        step = s.steps[e.step_id]
        step.status, step.skip_reason = "skipped", e.reason
    elif kind == "StepResultIgnored":
        step = s.steps[e.step_id]
        task = step.tasks.get(e.item)
        if task is not None:
            task.finished.add(e.attempt)
            _set(s, e.step_id, step, e.item, task, task.status)  # it may be an orphan now
    elif kind == "StepReprocessRequested":
        step = s.steps[e.step_id]
        task = step.tasks.get(e.item)
        if task is None:  # the step failed before any task existed (e.g. a bad input mapping)
            step.status = "pending"
        else:
            task.budget_from, task.patch = task.attempt, e.patch
            _set(s, e.step_id, step, e.item, task, "reprocess")
            step.status = "scheduled"
        _reopen(s)
    elif kind == "ExecutionRetried":
        for step_id, step in s.steps.items():
            if step.status != "dead_lettered":
                continue
            if not step.tasks:
                step.status = "pending"
            for item, task in step.tasks.items():
                if task.status == "dead_lettered":
                    task.budget_from = task.attempt
                    _set(s, step_id, step, item, task, "reprocess")
            if step.tasks:
                step.status = "scheduled"
        _reopen(s)
    elif kind == "ExecutionCompleted":
        s.status, s.output, s.finished_at = COMPLETED, e.output, e.at
    elif kind == "ExecutionFailed":
        s.status, s.error, s.finished_at = FAILED, (e.step_id, e.error_type, e.error_message), e.at
    elif kind == "ExecutionCancelled":
        s.status, s.finished_at = CANCELLED, e.at
    elif kind == "ExecutionPaused":
        s.status = PAUSED
    elif kind == "ExecutionResumed":
        s.status = RUNNING
    return s


def _set(s: Execution, step_id: str, step: Step, item: int | None, task: Task, status: str) -> None:
    """Every change of a task's status goes through here, to keep `step.succeeded` and
    `s.attention` true without walking the tasks."""
    if task.status == "succeeded":
        step.succeeded -= 1
    task.status = status
    if status == "succeeded":
        step.succeeded += 1
    if status in ("failed", "reprocess") or task.orphaned():
        s.attention.add((step_id, item))
    else:
        s.attention.discard((step_id, item))


def wanting_attempts(s: Execution) -> list[tuple[str, int | None]]:
    """`s.attention` in the order the definition lists the steps, then by item."""
    if not s.attention:
        return []
    order = {step_id: i for i, step_id in enumerate(s.steps)}
    return sorted(s.attention, key=lambda k: (order[k[0]], -1 if k[1] is None else k[1]))


def _reopen(s: Execution) -> None:
    s.status, s.finished_at, s.error, s.output = RUNNING, None, None, None


def fold(execution_id: str, history: list[Any]) -> Execution:
    state = Execution(id=execution_id)
    for e in history:
        evolve(state, e)
    return state


def step_view(s: Execution) -> list[dict[str, Any]]:
    """Per-step summary for status output."""
    out = []
    for step_id, step in s.steps.items():
        attempts = max((t.attempt for t in step.tasks.values()), default=0)
        errors = [t.error for t in step.tasks.values() if t.error and t.status != "succeeded"]
        out.append(
            {
                "step_id": step_id,
                "status": step.status,
                "attempts": attempts,
                "items": step.count,
                "output": step.output,
                "error": {"type": errors[0][0], "message": errors[0][1]} if errors else None,
                "reused_from": step.reused_from,
                "skip_reason": step.skip_reason,
            }
        )
    return out


def summary(s: Execution, *, steps: bool = False) -> dict[str, Any]:
    """What the CLI and the HTTP API show of an execution."""
    error = {"step_id": s.error[0], "type": s.error[1], "message": s.error[2]} if s.error else None
    out: dict[str, Any] = {
        "id": s.id,
        "execution_id": s.id,
        "status": s.status,
        "workflow": s.workflow,
        "version": s.workflow_version,
        "output": s.output,
        "error": error,
        "started_at": s.started_at.isoformat() if s.started_at else None,
        "finished_at": s.finished_at.isoformat() if s.finished_at else None,
        "replay_of": s.replay_of,
        "events": s.version,
    }
    if s.started_at and s.finished_at:
        out["duration_ms"] = round((s.finished_at - s.started_at).total_seconds() * 1000, 1)
    if steps:
        out["steps"] = step_view(s)
    return out
