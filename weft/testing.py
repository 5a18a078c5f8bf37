"""Run a workflow in-process, in milliseconds, for a user's own pytest: `weft.testing`.

    from weft import testing

    result = testing.run(orders, {"order_id": "A-1", "items": ["a"]}, mocks={"ship_each": {"sku": "a", "parcel": "P"}})
    assert result.status == "completed"
    result.history          # the events, as `weft history --json` prints them
    result.attempts("reserve")

This is not a second engine. The execution lives in a real event store (a
private in-memory SQLite database) and every change goes through the
orchestrator's application service (`Executions`: the pure `decide`/`evolve`,
appended as events), exactly as in production. Only the broker and the worker
fleet are replaced: the harness takes each `StepScheduled` in turn, runs it
(a mock, or the real step handler), and applies its result as the
orchestrator would apply a `StepResult`.

Mocks, per step id (a map step's mock is used for each item):
  * a value: the step's output;
  * an exception (instance or class): raised on every attempt;
  * a function `(input, ctx)`, sync or async: called like the real step;
  * `attempts(v1, v2, ...)`: one per attempt (the last repeats), each of the above;
  * `takes(seconds, mock)`: the step takes that long on the clock; over its timeout it fails as
    the worker fails it (`StepTimeout`).
Unmocked `python`, `transform` and `noop` steps run their real handlers;
`sleep` moves the clock; other types (`http`) need a mock: a test must not
reach the network by accident. As on a worker, a `python` step runs only code
from allowed modules: those of a `weft.Workflow`'s decorated step functions,
plus `step_modules=[...]` (a YAML definition names code; it never chooses it).

The clock starts at `Clock.START` and moves only when the harness waits out a
retry's backoff or a `takes`/`sleep`, so retries and timeouts cost no time.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = ["run", "arun", "Result", "Clock", "attempts", "takes", "HarnessError"]

_RUNNABLE = frozenset({"python", "transform", "noop"})


class HarnessError(RuntimeError):
    """The harness cannot run this workflow as asked (a step with no mock and no local handler, a loop)."""


class Clock:
    """A clock that moves only when told to."""

    START = datetime(2024, 1, 1, tzinfo=timezone.utc)

    def __init__(self, start: datetime | None = None):
        self.current = start or self.START

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=max(0.0, seconds))

    def advance_to(self, when: datetime) -> None:
        self.current = max(self.current, when)


@dataclass(frozen=True)
class _Attempts:
    mocks: tuple[Any, ...]


@dataclass(frozen=True)
class _Takes:
    seconds: float
    mock: Any


def attempts(*mocks: Any) -> _Attempts:
    """One mock per attempt: `attempts(ConnectionError("down"), {"ok": True})` fails once, then succeeds."""
    if not mocks:
        raise ValueError("attempts() needs at least one mock")
    return _Attempts(mocks)


def takes(seconds: float, mock: Any = None) -> _Takes:
    """The step takes `seconds` on the harness clock, then does `mock`."""
    return _Takes(float(seconds), mock)


@dataclass
class Result:
    execution_id: str
    status: str  # completed | failed | cancelled | running (stopped at max_tasks) | paused
    output: Any
    error: dict[str, Any] | None  # {step_id, type, message} of a failed execution
    history: list[dict[str, Any]]  # {"seq", "type", ...}: what `weft history --json` prints
    steps: list[dict[str, Any]]  # per step, as `weft status --json` shows them
    calls: list[tuple[str, int | None, int]] = field(default_factory=list)  # (step, item, attempt) in run order
    clock: Clock | None = None

    def events(self, type: str | None = None, step_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.history
                if (type is None or e["type"] == type) and (step_id is None or e.get("step_id") == step_id)]

    def attempts(self, step_id: str, item: int | None = None) -> int:
        """How many attempts of the step (of one map item) ran."""
        return sum(1 for s, i, _ in self.calls if s == step_id and i == item)

    def step_output(self, step_id: str) -> Any:
        for row in self.steps:
            if row["step_id"] == step_id:
                return row.get("output")
        raise KeyError(step_id)


def run(workflow: Any, input: Any = None, *, mocks: Mapping[str, Any] | None = None, clock: Clock | None = None,
        max_tasks: int = 10_000, step_modules: Iterable[str] = ()) -> Result:
    """Run `workflow` (a weft.Workflow, a WorkflowDef, or YAML/JSON text) to its end. See the module's doc."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(arun(workflow, input, mocks=mocks, clock=clock, max_tasks=max_tasks,
                                step_modules=step_modules))
    raise HarnessError("testing.run() was called inside a running event loop: use `await testing.arun(...)`")


async def arun(workflow: Any, input: Any = None, *, mocks: Mapping[str, Any] | None = None,
               clock: Clock | None = None, max_tasks: int = 10_000, step_modules: Iterable[str] = ()) -> Result:
    from contracts import events as ev
    from services.orchestrator.executions import Executions
    from services.orchestrator.registry import Registry
    from services.orchestrator.state import step_view
    from services.store import open_store

    wf = _definition(workflow)
    mocks = dict(mocks or {})
    unknown = sorted(set(mocks) - set(wf.steps_by_id))
    if unknown:
        raise HarnessError(f"mocks name no step of {wf.name!r}: {unknown} (steps: {sorted(wf.steps_by_id)})")
    clock = clock or Clock()
    handlers = _handlers(_own_modules(workflow) + tuple(step_modules))
    store = open_store("sqlite:///:memory:")
    try:
        executions = Executions(store, clock=clock.now)
        version = Registry(store, clock=clock.now).publish(wf)
        state, _ = executions.start(version, {} if input is None else input)
        eid, seen = state.id, 0
        calls: list[tuple[str, int | None, int]] = []  # (step, item, attempt) in run order
        pending: dict[tuple[str, int | None], Any] = {}  # the latest StepScheduled of each task not yet run
        stream, finished = uuid.UUID(eid), False
        while True:
            for rec in store.load(stream, after_version=seen):  # only what was appended since
                seen = rec.version
                finished = finished or rec.type in ev.FINISHING
                if rec.type == "StepScheduled":
                    e = ev.decode(rec.type, rec.data)
                    pending[(e.step_id, e.item)] = e
            if finished or not pending:
                break
            due = min(e.not_before or clock.now() for e in pending.values())
            clock.advance_to(due)  # a backoff passes at once
            # Every task due now runs, in the order it was scheduled, and their results are applied
            # in one batch: the orchestrator's own batch path (Executions.apply_results).
            ready = [e for e in pending.values() if e.not_before is None or e.not_before <= clock.now()]
            if len(calls) + len(ready) > max_tasks:
                raise HarnessError(f"stopped after {len(calls)} tasks (max_tasks={max_tasks}): the execution "
                                   "is still running")
            results = []
            for task in ready:
                del pending[(task.step_id, task.item)]
                calls.append((task.step_id, task.item, task.attempt))
                results.append(await _execute(eid, wf, task, mocks.get(task.step_id, _UNMOCKED), handlers, clock))
            executions.apply_results(results)
        history = executions.history(eid)
        state = executions.load(eid)
        rows = [{"seq": i + 1, **e.model_dump(mode="json")} for i, e in enumerate(history)]
        error = None
        if state.error is not None:
            error = dict(zip(("step_id", "type", "message"), state.error))
        return Result(eid, state.status, state.output, error, rows, step_view(state), calls, clock)
    finally:
        store.close()


_UNMOCKED = object()


def _definition(workflow: Any) -> Any:
    from contracts.definitions import WorkflowDef, parse_definition

    if isinstance(workflow, WorkflowDef):
        return workflow
    if hasattr(workflow, "definition") and callable(workflow.definition):
        return workflow.definition()
    if isinstance(workflow, (str, bytes, dict)):
        return parse_definition(workflow)
    raise TypeError(f"testing.run needs a weft.Workflow, a WorkflowDef or definition text, not {type(workflow).__name__}")


def _own_modules(workflow: Any) -> tuple[str, ...]:
    """The modules of a weft.Workflow's decorated step functions: code its author registered."""
    functions = getattr(workflow, "functions", None)
    if not isinstance(functions, dict):
        return ()
    from weft.workflow import _callable_path

    return tuple(sorted({_callable_path(fn).partition(":")[0] for fn in functions.values()}))


def _handlers(modules: tuple[str, ...]) -> Any:
    """The real step handlers; `python` steps may call only into `modules` (as a worker's allowlist)."""
    from services.worker.steps import StepModules, default_registry

    return default_registry(step_modules=StepModules(modules))


async def _execute(eid: str, wf: Any, task: Any, mock: Any, handlers: Any, clock: Clock) -> Any:
    from contracts.messages import StepError, StepResult
    from services.worker.runtime import _error
    from weft.steps import StepContext

    ctx = StepContext(execution_id=eid, step_id=task.step_id, attempt=task.attempt,
                      idempotency_key=task.idempotency_key, item=task.item, workflow=wf.name,
                      worker_id="weft.testing")
    started = clock.now()
    if isinstance(mock, _Attempts):
        mock = mock.mocks[min(task.attempt, len(mock.mocks)) - 1]
    try:
        if isinstance(mock, _Takes):
            clock.advance(mock.seconds)
            if task.timeout is not None and mock.seconds > task.timeout:
                raise _Timeout(task.timeout)
            mock = mock.mock
        output = await _outcome(mock, task, ctx, handlers, clock)
        error = None
    except _Timeout as exc:
        output, error = None, StepError(type="StepTimeout", message=f"step timed out after {exc.seconds}s")
    except asyncio.TimeoutError:
        output, error = None, StepError(type="StepTimeout", message=f"step timed out after {task.timeout}s")
    except HarnessError:
        raise
    except Exception as exc:
        output, error = None, _error(exc)
    if error is None:
        try:  # what the worker would send: plain JSON
            import orjson

            if hasattr(output, "model_dump"):  # a mock may be a pydantic model, as the step returns
                output = output.model_dump(mode="json")
            output = orjson.loads(orjson.dumps(output))
        except (TypeError, orjson.JSONEncodeError) as exc:
            output, error = None, StepError(type="OutputNotJSONError", message=str(exc), non_retryable=True)
    return StepResult(execution_id=eid, step_id=task.step_id, item=task.item, attempt=task.attempt,
                      status="failed" if error else "succeeded", output=output, error=error,
                      worker_id="weft.testing", started_at=started, finished_at=clock.now(),
                      scheduled_at=task.at)


class _Timeout(Exception):
    def __init__(self, seconds: float):
        self.seconds = seconds


async def _outcome(mock: Any, task: Any, ctx: Any, handlers: Any, clock: Clock) -> Any:
    if mock is _UNMOCKED:
        if task.step_type == "sleep":
            clock.advance(float(task.config.get("seconds", 0)))
            return task.input
        if task.step_type not in _RUNNABLE:
            raise HarnessError(f"step {task.step_id!r} is a {task.step_type} step: give it a mock "
                               "(testing.run(..., mocks={...})); the harness does not reach the network")
        handler = handlers.get(task.step_type)
        return await asyncio.wait_for(handler(task.input, task.config, ctx), timeout=task.timeout)
    if isinstance(mock, BaseException):
        raise mock
    if isinstance(mock, type) and issubclass(mock, BaseException):
        raise mock(f"mocked {mock.__name__} in step {task.step_id!r}")
    if callable(mock):
        value = mock(task.input, ctx) if len(inspect.signature(mock).parameters) >= 2 else mock(task.input)
        return await value if inspect.isawaitable(value) else value
    return mock
