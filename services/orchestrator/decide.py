"""`decide`: the orchestrator's brain. Pure: state + command + now -> new events.

No I/O, no clock, no randomness: time comes in as `now`, ids are derived from
the execution id. The same inputs always give the same events, which is what
makes replay exact and lets the DAG rules be tested exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable

from contracts import events as ev
from contracts.definitions import WorkflowDef
from contracts.expressions import Budget, ExpressionError, evaluate, render, truthy
from contracts.messages import StepResult, task_key
from contracts.payloads import guard, is_ref
from services.orchestrator.backoff import backoff
from services.orchestrator.state import FINISHED, PAUSED, RUNNING, Execution, evolve, wanting_attempts


class DecisionError(ValueError):
    """A command that does not apply to the execution as it is."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class UnknownTask(DecisionError):
    """A result for a step or map item this execution does not have."""


@dataclass(frozen=True)
class Start:
    definition: WorkflowDef
    version: int
    content_hash: str
    input: Any = None
    trigger: dict[str, Any] | None = None
    replay_of: str | None = None
    reused: dict[str, Any] = field(default_factory=dict)  # step id -> output to keep
    idempotency_key: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True)
class Cancel:
    by: str = "user"
    why: str | None = None


@dataclass(frozen=True)
class Pause:
    by: str = "user"
    why: str | None = None


@dataclass(frozen=True)
class Resume:
    by: str = "user"
    why: str | None = None


@dataclass(frozen=True)
class Retry:
    by: str = "user"
    why: str | None = None


@dataclass(frozen=True)
class Reprocess:
    step_id: str
    item: int | None = None
    patch: dict[str, Any] | None = None
    by: str = "user"
    why: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class Undeliverable:
    """A task attempt whose message can never be handled: its command or its result cannot be
    published (too large, say), or handling it kills the process that tries (a poison message).
    Fails the attempt non-retryably and dead-letters the step, so the execution ends."""

    step_id: str
    item: int | None
    attempt: int
    error_type: str  # PayloadTooLarge, PoisonMessage, ...
    reason: str


Command = Start | StepResult | Cancel | Pause | Resume | Retry | Reprocess | Undeliverable


def decide(state: Execution, command: Command, now: datetime) -> list[Any]:
    """The events that `command` causes. Never mutates `state`."""
    return decide_into(state.copy(), command, now)


def decide_into(scratch: Execution, command: Command, now: datetime) -> list[Any]:
    """`decide` on a state the caller owns: the events are folded into `scratch` too.

    The orchestrator's batch path folds many results into one working copy;
    this spares it a copy of the state per result.
    """
    out: list[Any] = []

    def emit(event: Any) -> None:
        out.append(event)
        evolve(scratch, event)

    if isinstance(command, Start):
        if scratch.version == 0:
            _start(scratch, command, now, emit)
    elif isinstance(command, StepResult):
        _result(scratch, command, now, emit)
    elif isinstance(command, Undeliverable):
        if scratch.version == 0:
            raise DecisionError("not_found", f"execution {scratch.id} does not exist")
        _undeliverable(scratch, command, now, emit)
    else:
        if scratch.version == 0:
            raise DecisionError("not_found", f"execution {scratch.id} does not exist")
        _control(scratch, command, now, emit)
    return out


Emit = Callable[[Any], None]


def _start(s: Execution, c: Start, now: datetime, emit: Emit) -> None:
    unknown = sorted(set(c.reused) - {step.id for step in c.definition.steps})
    if unknown:  # a replay onto a version without these steps: refuse, do not crash in evolve
        raise DecisionError("unknown_step", f"cannot reuse outputs of unknown steps {unknown}")
    emit(
        ev.ExecutionStarted(
            at=now, workflow=c.definition.name, version=c.version, content_hash=c.content_hash,
            definition=c.definition.canonical(), input=c.input, trigger=c.trigger,
            replay_of=c.replay_of, reused=c.reused, idempotency_key=c.idempotency_key,
            trace_id=c.trace_id,
        )
    )
    for step_id, output in c.reused.items():
        emit(ev.StepSucceeded(at=now, step_id=step_id, attempt=0, output=output, reused_from=c.replay_of))
    _advance(s, now, emit)


def _result(s: Execution, r: StepResult, now: datetime, emit: Emit) -> None:
    step = s.steps.get(r.step_id)
    task = step.tasks.get(r.item) if step is not None else None
    if step is None or task is None:
        raise UnknownTask("unknown_task", f"execution {s.id} has no task {r.step_id}#{r.item}")
    if r.attempt in task.finished:
        return  # a duplicate of a result already recorded: at most one per attempt
    if s.status in FINISHED or r.attempt != task.attempt or task.status != "scheduled":
        why = f"execution {s.status}" if s.status in FINISHED else "stale attempt"
        emit(ev.StepResultIgnored(at=now, step_id=r.step_id, item=r.item, attempt=r.attempt, outcome=r.status, reason=why))
        return
    if r.status == "succeeded":
        emit(
            ev.StepSucceeded(
                at=now, step_id=r.step_id, item=r.item, attempt=r.attempt, output=r.output,
                worker_id=r.worker_id, started_at=r.started_at, finished_at=r.finished_at,
            )
        )
    else:
        err = r.error
        etype, emsg = (err.type, err.message) if err else ("UnknownError", "no error given")
        policy = s.definition.step(r.step_id).retry  # type: ignore[union-attr]
        non_retryable = bool(err and err.non_retryable) or etype in policy.non_retryable
        exhausted = task.attempt - task.budget_from >= policy.max_attempts
        emit(
            ev.StepFailed(
                at=now, step_id=r.step_id, item=r.item, attempt=r.attempt, error_type=etype,
                error_message=emsg, traceback=err.traceback if err else None,
                retryable=not (non_retryable or exhausted),
                next_retry_delay=err.next_retry_delay if err else None,
                worker_id=r.worker_id, started_at=r.started_at, finished_at=r.finished_at,
            )
        )
        if non_retryable or exhausted:
            why = "non-retryable error" if non_retryable else f"retries exhausted after {task.attempt - task.budget_from} attempts"
            _dead_letter(s, r.step_id, r.item, r.attempt, etype, emsg, why, now, emit)
            return
    _advance(s, now, emit)


def _undeliverable(s: Execution, c: Undeliverable, now: datetime, emit: Emit) -> None:
    step = s.steps.get(c.step_id)
    task = step.tasks.get(c.item) if step is not None else None
    # Only the attempt still waited for: anything else is a copy of a decision already taken
    # (the relay or a consumer met the same message again after a crash), so nothing happens.
    if task is None or s.status in FINISHED or c.attempt != task.attempt or task.status != "scheduled":
        return
    emit(
        ev.StepFailed(
            at=now, step_id=c.step_id, item=c.item, attempt=c.attempt, error_type=c.error_type,
            error_message=c.reason, retryable=False,
        )
    )
    _dead_letter(s, c.step_id, c.item, c.attempt, c.error_type, c.reason, "non-retryable: undeliverable message", now, emit)


def _dead_letter(
    s: Execution, step_id: str, item: int | None, attempt: int, etype: str, emsg: str, why: str,
    now: datetime, emit: Emit,
) -> None:
    emit(ev.StepDeadLettered(at=now, step_id=step_id, item=item, attempt=attempt, error_type=etype, error_message=emsg, reason=why))
    emit(ev.ExecutionFailed(at=now, step_id=step_id, error_type=etype, error_message=emsg))


def _control(s: Execution, c: Command, now: datetime, emit: Emit) -> None:
    if isinstance(c, Cancel):
        if s.finished:
            raise DecisionError("finished", f"execution {s.id} is already {s.status}")
        emit(ev.ExecutionCancelled(at=now, by=c.by, why=c.why))
    elif isinstance(c, Pause):
        if s.status == PAUSED:
            return
        if s.status != RUNNING:
            raise DecisionError("not_running", f"execution {s.id} is {s.status}, not running")
        emit(ev.ExecutionPaused(at=now, by=c.by, why=c.why))
    elif isinstance(c, Resume):
        if s.status == RUNNING:
            return
        if s.status != PAUSED:
            raise DecisionError("not_paused", f"execution {s.id} is {s.status}, not paused")
        emit(ev.ExecutionResumed(at=now, by=c.by, why=c.why))
        _advance(s, now, emit)
    elif isinstance(c, Retry):
        if s.status != "failed":
            raise DecisionError("not_failed", f"execution {s.id} is {s.status}; only a failed execution can be retried")
        emit(ev.ExecutionRetried(at=now, by=c.by, why=c.why))
        _advance(s, now, emit)
    elif isinstance(c, Reprocess):
        step = s.steps.get(c.step_id)
        if step is None:
            raise DecisionError("unknown_step", f"execution {s.id} has no step {c.step_id!r}")
        task = step.tasks.get(c.item)
        if task is None and step.tasks:
            raise DecisionError("unknown_step", f"step {c.step_id!r} has no map item {c.item}")
        if task is None and step.status != "dead_lettered":
            raise DecisionError("unknown_step", f"step {c.step_id!r} is {step.status}: it ran no task to reprocess")
        if task is not None and task.status != "dead_lettered":
            return  # already reprocessed: one new attempt, not two
        if s.status == "cancelled":
            raise DecisionError("finished", f"execution {s.id} was cancelled")
        emit(
            ev.StepReprocessRequested(
                at=now, step_id=c.step_id, item=c.item, patch=c.patch, by=c.by, why=c.why, request_id=c.request_id,
            )
        )
        _advance(s, now, emit)


def _context(s: Execution) -> dict[str, Any]:
    # A payload stored by reference can be passed on whole, but an expression that looks
    # inside it fails with a clear error (contracts.payloads.Guarded), never a silent null.
    steps = {sid: {"output": guard(st.output), "status": st.status} for sid, st in s.steps.items()}
    return {"input": guard(s.input), "steps": steps, "execution": {"id": s.id, "workflow": s.workflow}}


def _advance(s: Execution, now: datetime, emit: Emit) -> None:
    """Schedule what is ready, skip what must be skipped, finish when all is done."""
    if s.status != RUNNING:
        return
    wf = s.definition
    assert wf is not None
    _reschedule(s, wf, now, emit)
    progress = True
    while progress and s.status == RUNNING:
        progress = False
        for step_def in wf.steps:
            if s.status != RUNNING:
                break  # a step dead-lettered at schedule time failed the execution: schedule no more
            step = s.steps[step_def.id]
            if step.status == "scheduled" and step.count is not None:
                if step.succeeded == step.count and len(step.tasks) == step.count:
                    outputs = [step.tasks[i].output for i in range(step.count)]
                    emit(ev.StepSucceeded(at=now, step_id=step_def.id, attempt=0, output=outputs))
                    progress = True
                continue
            if step.status != "pending":
                continue
            parents = [s.steps[p].status for p in step_def.needs]
            if any(p not in ("succeeded", "skipped") for p in parents):
                continue
            progress = True
            if parents and all(p == "skipped" for p in parents):
                emit(ev.StepSkipped(at=now, step_id=step_def.id, reason="all parents skipped"))
                continue
            _schedule_step(s, step_def, now, emit)
    if s.status == RUNNING and all(st.status in ("succeeded", "skipped") for st in s.steps.values()):
        try:
            output = render(wf.output, _context(s)) if wf.output is not None else None
        except ExpressionError as exc:  # a budget error too: the execution fails, the process carries on
            emit(ev.ExecutionFailed(at=now, error_type=type(exc).__name__, error_message=str(exc)))
            return
        emit(ev.ExecutionCompleted(at=now, output=output))


def _schedule_step(s: Execution, step_def: Any, now: datetime, emit: Emit) -> None:
    ctx = _context(s)
    budget = Budget()  # one for the step: its when, its map and every item's input together
    try:
        if step_def.when is not None and not truthy(evaluate(_inner(step_def.when), ctx, budget)):
            emit(ev.StepSkipped(at=now, step_id=step_def.id, reason=f"when was false: {step_def.when.strip()}"))
            return
        if step_def.map is None:
            data = render(step_def.input, ctx, budget) if step_def.input is not None else s.input
            _schedule(s, step_def, None, 1, data, now, None, "ready", emit, _config(step_def, ctx, budget))
            return
        items = evaluate(_inner(step_def.map), ctx, budget)
        if not isinstance(items, list):
            got = "a value stored by reference (over WEFT_PAYLOAD_INLINE_LIMIT)" if is_ref(items) else type(items).__name__
            raise ExpressionError(step_def.map, f"map needs a list, got {got}")
        budget.spend_elements(step_def.map, len(items))  # each item becomes a task: a value created
        inputs = [render(step_def.input, {**ctx, "item": x}, budget) if step_def.input is not None else x
                  for x in items]
        configs = [_config(step_def, {**ctx, "item": x}, budget) for x in items]
    except ExpressionError as exc:
        # Not retryable (the same data gives the same error): the step is dead-lettered, which fails
        # the execution, with the reason; a budget error is one of these, never a crash.
        _dead_letter(s, step_def.id, None, 0, type(exc).__name__, str(exc), "input error", now, emit)
        return
    emit(ev.StepMapped(at=now, step_id=step_def.id, count=len(inputs)))
    if not inputs:
        emit(ev.StepSucceeded(at=now, step_id=step_def.id, attempt=0, output=[]))
    for i, data in enumerate(inputs):
        _schedule(s, step_def, i, 1, data, now, None, "ready", emit, configs[i])


def _config(step_def: Any, ctx: dict[str, Any], budget: Budget) -> dict[str, Any]:
    # `with:` may use expressions too (`url: "${{ input.url }}"`); secrets stay references.
    # A mapping template renders to a mapping of the same keys.
    config: dict[str, Any] = render(step_def.with_, ctx, budget) if _has_expressions(step_def.with_) else step_def.with_
    return config


def _has_expressions(value: Any) -> bool:
    if isinstance(value, str):
        return "${{" in value
    if isinstance(value, dict):
        return any(_has_expressions(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_expressions(v) for v in value)
    return False


def _inner(expression: str) -> str:
    text = expression.strip()
    return text[3:-2] if text.startswith("${{") and text.endswith("}}") else text


def _schedule(
    s: Execution, step_def: Any, item: int | None, attempt: int, data: Any, now: datetime,
    not_before: datetime | None, reason: str, emit: Emit, config: dict[str, Any] | None = None,
) -> None:
    emit(
        ev.StepScheduled(
            at=now, step_id=step_def.id, item=item, attempt=attempt, step_type=step_def.type,
            config=step_def.with_ if config is None else config, input=data,
            idempotency_key=task_key(s.id, step_def.id, item),
            timeout=step_def.timeout, not_before=not_before, reason=reason, secrets=step_def.secret_refs,
            **_traced(s),
        )
    )


def _traced(s: Execution) -> dict[str, Any]:
    """Every step carries its workflow's name and version (the worker's StepContext tells the
    handler, and the hops' spans are labelled with them); a traced execution's, its trace context."""
    out: dict[str, Any] = {"workflow": s.workflow, "workflow_version": s.workflow_version}
    if s.trace_id is not None:
        out["trace_id"] = s.trace_id
    return out


def _reschedule(s: Execution, wf: WorkflowDef, now: datetime, emit: Emit) -> None:
    """New attempts for failed tasks (after backoff), reprocess requests and orphans."""
    for step_id, item in wanting_attempts(s):  # not every task: see Execution.attention
        step_def = wf.step(step_id)
        task = s.steps[step_id].tasks[item]
        if task.status == "failed":
            failures = task.attempt - task.budget_from
            key = task_key(s.id, step_def.id, item)
            delay = backoff(step_def.retry, failures, key, task.next_retry_delay)
            when = now + timedelta(seconds=delay) if delay > 0 else None
            _schedule(s, step_def, item, task.attempt + 1, task.input, now, when, "retry", emit, task.config)
        elif task.status == "reprocess":
            data = merge_patch(task.input, task.patch) if task.patch is not None else task.input
            _schedule(s, step_def, item, task.attempt + 1, data, now, None, "reprocess", emit, task.config)
        elif task.orphaned():
            _schedule(s, step_def, item, task.attempt + 1, task.input, now, None, "resume", emit, task.config)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
