"""One writer of execution events: `Executions.apply` in services/orchestrator/executions.py.

A static check that no other module decides or appends execution events, and
behaviour checks that triggers, dead-letter actions and control commands get
their events stored through it (one transaction per batch, one relay wake-up).
"""

from __future__ import annotations

import ast
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from contracts import deadletters as dl
from contracts.definitions import parse_definition
from contracts.messages import StepResult
from contracts.triggers import trigger_stream
from services.deadletters.actions import Actions
from services.orchestrator.decide import Cancel, Pause
from services.orchestrator.executions import Change, Executions, start_command
from services.orchestrator.registry import Registry
from services.store import NewEvent, open_store
from services.triggers.ingest import Ingestor, Trigger
from services.triggers.publish import new_event
from services.triggers.routing import Catalog

ROOT = Path(__file__).resolve().parents[2]
WRITER = "services/orchestrator/executions.py"
# Modules that append streams of their own, never an execution's: a workflow's versions, an API
# key's life, a dead letter's arrival, a webhook signature's use, an operation's record.
OTHER_STREAMS = {
    "services/orchestrator/registry.py", "services/gateway/keys.py", "services/deadletters/ingest.py",
    "services/triggers/webhooks.py", "services/replay/operations.py",
}


def _modules() -> list[tuple[str, ast.Module]]:
    out = []
    for base in ("services", "weft", "contracts"):
        for path in sorted((ROOT / base).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            out.append((rel, ast.parse(path.read_text(), rel)))
    return out


def _appends_to_a_store(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "append"):
        return False
    target = node.func.value
    name = target.attr if isinstance(target, ast.Attribute) else target.id if isinstance(target, ast.Name) else ""
    return name == "store" or name.endswith("_store")


def test_only_the_execution_service_decides_and_appends_execution_events() -> None:
    deciders, appenders = set(), set()
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "services.orchestrator.decide":
                if {a.name for a in node.names} & {"decide", "decide_into"}:
                    deciders.add(rel)
            if _appends_to_a_store(node):
                appenders.add(rel)
    assert deciders == {WRITER}, f"only {WRITER} may call the core's decide: {sorted(deciders - {WRITER})}"
    assert appenders - OTHER_STREAMS == {WRITER}, f"store.append outside the writer: {sorted(appenders - OTHER_STREAMS)}"
    for rel, tree in _modules():  # the other-stream writers do not build execution events either
        if rel in OTHER_STREAMS:
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "contracts"
                        for a in n.names}
            assert "events" not in imported, f"{rel} appends and imports contracts.events"


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = open_store(f"sqlite:///{tmp_path}/w.db")
    yield s
    s.close()


DEF = "name: w\non: [{event: t.x}]\nsteps: [{id: a, type: noop}, {id: b, type: noop, needs: [a]}]\n"


def _executions(store: Any) -> tuple[Executions, list[int]]:
    woken: list[int] = []
    executions = Executions(store)
    executions.listeners.append(lambda: woken.append(1))
    return executions, woken


def test_a_batch_of_starts_and_commands_is_one_transaction_and_one_wakeup(store: Any) -> None:
    version = Registry(store).publish(parse_definition(DEF))
    executions, woken = _executions(store)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    out = executions.apply([Change(i, start_command(version, {})) for i in ids])
    assert [o.status for o in out] == ["applied"] * 3 and woken == [1]
    head = store.head()
    out = executions.apply([Change(ids[0], Cancel()), Change(ids[1], Pause()), Change(ids[0], Cancel()),
                            Change(str(uuid.uuid4()), Cancel()), Change(ids[2], start_command(version, {}))])
    assert [o.status for o in out] == ["applied", "applied", "failed", "not_found", "exists"]  # a finished one refuses
    assert woken == [1, 1]
    assert [r.type for r in store.read(head, 10)] == ["ExecutionCancelled", "ExecutionPaused"]


def test_a_rider_is_stored_with_its_command_or_not_at_all(store: Any) -> None:
    version = Registry(store).publish(parse_definition(DEF))
    executions, woken = _executions(store)
    eid = str(uuid.uuid4())
    executions.start(version, {}, execution_id=eid)
    taken = uuid.uuid4()
    store.append([NewEvent(taken, 1, "Note", b"{}")])
    # the rider collides: the whole change is refused, the cancel too
    [out] = executions.apply([Change(eid, Cancel(), riders=[NewEvent(taken, 1, "Note", b"{}")])])
    assert out.status == "conflict" and taken in out.collided
    assert executions.load(eid, fresh=True).status == "running"
    # a command the core decides nothing for stores no rider either
    [out] = executions.apply([Change(eid, Pause(), riders=[NewEvent(taken, 2, "Note", b"{}")])])
    assert out.status == "applied"
    [out] = executions.apply([Change(eid, Pause(), riders=[NewEvent(taken, 3, "Note", b"{}")])])
    assert out.status == "unchanged" and len(store.load(taken)) == 2


def test_triggers_start_through_the_writer_and_wake_the_relay_once_per_batch(store: Any) -> None:
    Registry(store).publish(parse_definition(DEF))
    executions, woken = _executions(store)
    ingestor = Ingestor(executions, Catalog(store))
    batch = [Trigger(new_event("t.x", {"n": n}, id=f"e-{n}", source="s")) for n in range(10)]
    outcomes = ingestor.ingest(batch)
    assert [o.status for o in outcomes] == ["accepted"] * 10 and woken == [1]
    for o in outcomes:  # what the writer stored is what the trigger log says it started
        [eid] = o.executions.values()
        assert executions.load(eid).trigger["id"] == o.id
        assert orjson.loads(store.load(trigger_stream("s", o.id))[0].data)["executions"] == o.executions
    # an execution started by hand under a trigger's key stands for the trigger's: one batch, no loss
    assert [o.status for o in ingestor.ingest(batch[:2] + [
        Trigger(new_event("t.x", {}, id="e-new", source="s"))])] == ["duplicate", "duplicate", "accepted"]


def test_a_dead_letter_reprocess_goes_through_the_writer(store: Any) -> None:
    Registry(store).publish(parse_definition(
        "name: f\nsteps: [{id: a, type: noop, retry: {max_attempts: 1}}]\n"))
    executions, woken = _executions(store)
    state, _ = executions.start(Registry(store).get("f"), {})
    executions.apply_results([StepResult(execution_id=state.id, step_id="a", attempt=1, status="failed",
                                         error={"type": "E", "message": "boom"})])
    assert executions.load(state.id).status == "failed"
    row_id = str(uuid.uuid4())
    row = {"id": row_id, "kind": "step", "source": "step", "execution_id": state.id, "step_id": "a", "item": None,
           "details": {"execution_version": executions.load(state.id).version}, "payload": "{}",
           "payload_encoding": "utf-8", "status": dl.OPEN}
    woken.clear()
    [out] = Actions(store, executions=executions).reprocess_steps([row], None, "ann", None)
    assert out.outcome == "reprocessed" and out.attempt == 2 and woken == [1]
    assert [r.type for r in store.load(uuid.UUID(row_id))] == ["DeadLetterReprocessed"]
    [again] = Actions(store, executions=executions).reprocess_steps([row], None, "ann", None)
    assert again.outcome == "already_reprocessed" and woken == [1]


def test_results_refused_as_a_batch_are_applied_one_by_one_through_the_writer(store: Any) -> None:
    version = Registry(store).publish(parse_definition(DEF))
    one, woken = _executions(store)
    two = Executions(store)  # another orchestrator: its writes make one's cache stale
    state, _ = one.start(version, {})
    two.command(state.id, Pause())
    two.command(state.id, Cancel())  # `one` still thinks it is running
    ok = StepResult(execution_id=state.id, step_id="a", attempt=1, status="succeeded", output=1)
    unknown = StepResult(execution_id=state.id, step_id="zz", attempt=1, status="succeeded")
    nobody = StepResult(execution_id=str(uuid.uuid4()), step_id="a", attempt=1, status="succeeded")
    woken.clear()
    out = one.apply_results([ok, unknown, nobody])
    assert [(o.status, o.reason) for o in out] == [
        ("applied", ""), ("unknown", out[1].reason), ("unknown", "no such execution")]
    assert "zz" in out[1].reason and woken
    # the result was recorded (as ignored: the execution was cancelled) with its inbox id
    assert store.seen([ok.message_id]) == {ok.message_id}
    assert [r.type for r in store.load(uuid.UUID(state.id))][-1] == "StepResultIgnored"
    assert [o.status for o in one.apply_results([ok])] == ["duplicate"]
