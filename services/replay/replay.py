"""Replay one past execution: plan (what is reused, what runs again), then start it.

A replay is a new execution (new id, so new idempotency keys for every step)
started through `Executions.start` with `replay_of` = the source. With a
`from_step`, every step outside `downstream(from_step)` that succeeded in the
source keeps its recorded output (`reused`: the core marks it succeeded with
`reused_from`, and does not run it); the step and everything downstream run
again. The input is the source's, with an optional RFC 7386 merge patch,
checked against the target version's input schema before anything is stored.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from contracts.definitions import Problem, validate_input
from contracts.payloads import PayloadError, PayloadTooLarge, refs_in
from services.orchestrator.decide import DecisionError, merge_patch
from services.orchestrator.executions import Executions, InputError, execution_id_for
from services.orchestrator.registry import Registry, UnknownWorkflow, Version
from services.orchestrator.state import Execution
from services.store import EventStore

VersionSpec = str | int  # "same" | "latest" | N


class ReplayError(Exception):
    """Why a replay cannot be planned or started. `code`: not_found | bad_input."""

    def __init__(self, code: str, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.code = code
        self.problems = problems or []

    @property
    def exit_code(self) -> int:
        return 1 if self.code == "not_found" else 2

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.problems:
            out["problems"] = [p.model_dump() for p in self.problems]
        return out


def parse_version(text: str | int | None) -> VersionSpec:
    """`same`, `latest` or a version number >= 1; ReplayError(bad_input) otherwise."""
    if text is None:
        return "same"
    if isinstance(text, int) or str(text).strip().isdigit():
        n = int(text)
        if n >= 1:
            return n
    elif str(text).strip().lower() in ("same", "latest"):
        return str(text).strip().lower()
    raise ReplayError("bad_input", f"version: expected same, latest or a number >= 1, got {text!r}")


@dataclass(slots=True)
class ReplayPlan:
    source: Execution
    target: Version
    input: Any
    reused: dict[str, Any]  # step id -> recorded output kept
    steps: list[dict[str, Any]]  # per step of the target: step_id, action (reuse | run), source_status
    from_step: str | None = None
    input_patch: Any = None
    dropped: list[str] = field(default_factory=list)  # source steps the target version does not have

    def describe(self) -> dict[str, Any]:
        return {
            "replay_of": self.source.id,
            "workflow": self.target.name,
            "source_version": self.source.workflow_version,
            "version": self.target.version,
            "from_step": self.from_step,
            "input": self.input,
            "input_patch": self.input_patch,
            "reuse": [s["step_id"] for s in self.steps if s["action"] == "reuse"],
            "run": [s["step_id"] for s in self.steps if s["action"] == "run"],
            "steps": self.steps,
            "dropped_steps": self.dropped,
        }


def same_version(state: Execution) -> Version:
    """The exact version the execution ran: its history carries the definition."""
    assert state.definition is not None and state.started_at is not None
    return Version(state.workflow, state.workflow_version, state.content_hash, state.definition, state.started_at)


def resolve_version(registry: Registry, state: Execution, spec: VersionSpec) -> Version:
    if spec == "same":
        return same_version(state)
    try:
        return registry.get(state.workflow, None if spec == "latest" else int(spec))
    except UnknownWorkflow as exc:
        raise ReplayError("bad_input", f"version: {exc}") from None


def load_source(executions: Executions, execution_id: str) -> Execution:
    try:
        uuid.UUID(execution_id)
    except ValueError:
        raise ReplayError("bad_input", f"not an execution id: {execution_id!r}") from None
    state = executions.load(execution_id, fresh=True)
    if not state.version:
        raise ReplayError("not_found", f"no execution {execution_id}")
    return state


def plan_replay(
    store: EventStore, execution_id: str, *, from_step: str | None = None, input_patch: Any = None,
    version: VersionSpec = "same", executions: Executions | None = None, registry: Registry | None = None,
) -> ReplayPlan:
    """What a replay would do. Raises ReplayError; stores nothing."""
    executions = executions or Executions(store)
    registry = registry or Registry(store)
    source = load_source(executions, execution_id)
    target = resolve_version(registry, source, parse_version(version))
    wf = target.definition
    ids = [s.id for s in wf.steps]
    rerun: set[str] = set(ids)
    if from_step is not None:
        if from_step not in ids:
            raise ReplayError(
                "bad_input", f"from_step: {target.name}@{target.version} has no step {from_step!r} "
                f"(steps: {', '.join(ids)})",
            )
        rerun = wf.downstream(from_step)
    reused: dict[str, Any] = {}
    steps = []
    for sid in ids:
        recorded = source.steps.get(sid)
        status = recorded.status if recorded is not None else None
        if sid not in rerun and recorded is not None and status == "succeeded":
            reused[sid] = recorded.output
            steps.append({"step_id": sid, "action": "reuse", "source_status": status})
        else:
            steps.append({"step_id": sid, "action": "run", "source_status": status})
    base = source.input
    if refs_in(base):  # stored by reference: the replay validates and patches the value itself
        base = executions.claims.resolve(base)
    data = base if input_patch is None else merge_patch(base, input_patch)
    problems = validate_input(wf, data)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise ReplayError("bad_input", f"the replay's input does not fit {target.name}@{target.version}:\n{lines}",
                          problems)
    dropped = [sid for sid in source.steps if sid not in ids]
    return ReplayPlan(source, target, data, reused, steps, from_step, input_patch, dropped)


def replay_id(workflow: str, key: str, source_id: str) -> str:
    """The execution id of a replay started under an idempotency key (API retries, bulk operations)."""
    return execution_id_for(workflow, replay_key(key, source_id))


def replay_key(key: str, source_id: str) -> str:
    return f"replay:{key}:{source_id}"


def replay_execution(
    store: EventStore, execution_id: str, *, from_step: str | None = None, input_patch: Any = None,
    version: VersionSpec = "same", dry_run: bool = False, idempotency_key: str | None = None,
    executions: Executions | None = None, registry: Registry | None = None,
) -> dict[str, Any]:
    """Replay one execution (or, with dry_run, say what it would do). For the CLI and the API.

    Without `idempotency_key` every call starts a new replay; with one, calling
    again with the same key and source returns the replay already started.
    Returns the plan plus `execution_id`, `status`, `created`, `dry_run`.
    Raises ReplayError (code not_found -> 404 / exit 1, bad_input -> 400 / exit 2).
    """
    executions = executions or Executions(store)
    plan = plan_replay(store, execution_id, from_step=from_step, input_patch=input_patch, version=version,
                       executions=executions, registry=registry)
    key = replay_key(idempotency_key, plan.source.id) if idempotency_key else None
    new_id = execution_id_for(plan.target.name, key) if key else None
    result = plan.describe()
    if dry_run:
        exists = bool(new_id and store.load(uuid.UUID(new_id), upto_version=1))
        return result | {"dry_run": True, "execution_id": new_id, "exists": exists}
    try:
        state, created = executions.start(
            plan.target, plan.input, execution_id=new_id or str(uuid.uuid4()), replay_of=plan.source.id,
            reused=plan.reused, idempotency_key=key,
        )
    except InputError as exc:
        raise ReplayError("bad_input", str(exc), exc.problems) from None
    except PayloadTooLarge:
        raise  # 413 on HTTP, exit 2 on the CLI
    except PayloadError as exc:
        raise ReplayError("bad_input", str(exc)) from None
    except DecisionError as exc:
        raise ReplayError("bad_input", str(exc)) from None
    if not created and state.replay_of != plan.source.id:
        raise ReplayError("bad_input", f"execution {state.id} exists and is not a replay of {plan.source.id}")
    return result | {"dry_run": False, "execution_id": state.id, "id": state.id, "status": state.status,
                     "created": created}
