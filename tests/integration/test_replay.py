"""Replay by id, from a step, with an input patch, dry run, bulk: over a real stack
(NATS, relay, workers, orchestrator, projector) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.projections import ExecutionsView, Projector, get_execution
from services.replay import ReplayError, bulk_replay, replay_execution
from services.replay.replay import replay_id
from tests.support import Running, assert_applied_once, stack_up

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
PARTS = ("orchestrator", "relay", "worker", "projector")

DIAMOND = """
name: diamond
input_schema: {type: object, required: [n], properties: {n: {type: integer}}}
steps:
  - {id: a, type: transform, with: {expression: "n"}, input: {n: "${{ input.n }}"}}
  - {id: b, type: transform, needs: [a], with: {expression: "sum([a, a])"}, input: {a: "${{ steps.a.output }}"}}
  - id: c
    type: transform
    needs: [a]
    with: {expression: "sum([a, n])"}
    input: {a: "${{ steps.a.output }}", n: "${{ input.n }}"}
  - id: d
    type: transform
    needs: [b, c]
    with: {expression: "sum([b, c])"}
    input: {b: "${{ steps.b.output }}", c: "${{ steps.c.output }}"}
output: {a: "${{ steps.a.output }}", b: "${{ steps.b.output }}", c: "${{ steps.c.output }}", d: "${{ steps.d.output }}"}
"""
DOWNSTREAM = {None: {"a", "b", "c", "d"}, "a": {"a", "b", "c", "d"}, "b": {"b", "d"}, "c": {"c", "d"}, "d": {"d"}}

CHECKED = """
name: checked
input_schema: {type: object, required: [n], properties: {n: {type: integer}}}
steps:
  - {id: load, type: transform, with: {expression: "n"}, input: {n: "${{ input.n }}"}}
  - id: check
    type: python
    needs: [load]
    with: {callable: "tests.integration.steps:positive"}
    input: {n: "${{ steps.load.output }}"}
    retry: {max_attempts: 1}
output: "${{ steps.check.output }}"
"""


@pytest.fixture
async def stack(tmp_path: Path, db_url: str, broker_url: str):
    async with stack_up(tmp_path, db_url, broker_url, parts=PARTS) as running:
        yield running


async def _replay(stack: Running, source: str, **kw: Any) -> dict[str, Any]:
    return await asyncio.to_thread(replay_execution, stack.stack.store, source, **kw)


def _cli(stack: Running, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEFT_HOME": str(stack.stack.settings.home), "WEFT_DATABASE_URL":
           stack.stack.settings.database_url, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "weft", *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


async def test_replay_from_the_start_and_from_each_step_of_a_diamond(stack: Running) -> None:
    version = stack.publish(DIAMOND)
    source = await stack.start(version, {"n": 1})
    original = await stack.finished(source)
    assert original.status == "completed" and original.output == {"a": 1, "b": 2, "c": 2, "d": 4}
    replays = []
    for step in (None, "a", "b", "c", "d"):
        result = await _replay(stack, source, from_step=step)
        rerun = DOWNSTREAM[step]
        assert set(result["run"]) == rerun and set(result["reuse"]) == {"a", "b", "c", "d"} - rerun
        new = result["execution_id"]
        assert new != source and result["created"]
        state = await stack.finished(new)
        assert state.status == "completed", (step, state.error)
        assert state.output == original.output and state.replay_of == source
        history = await stack.history(new)
        assert_applied_once(history)
        scheduled = {e.step_id for e in history if e.type == "StepScheduled"}
        reused = {e.step_id: e for e in history if e.type == "StepSucceeded" and e.reused_from}
        assert scheduled == rerun, step
        assert set(reused) == {"a", "b", "c", "d"} - rerun
        assert all(e.reused_from == source and e.attempt == 0 for e in reused.values())
        assert history[0].replay_of == source
        # a replay is a new execution: its steps get new idempotency keys
        assert all(e.idempotency_key.startswith(f"{new}:") for e in history if e.type == "StepScheduled")
        replays.append(new)
    # lineage, in the executions view and in `weft status`
    await asyncio.to_thread(Projector(stack.stack.store, [ExecutionsView()]).catch_up)
    with stack.stack.store.transaction() as tx:
        assert get_execution(tx, source)["replays"] == replays
        assert get_execution(tx, replays[0])["replay_of"] == source
    status = await asyncio.to_thread(_cli, stack, "status", source, "--json")
    assert status.returncode == 0, status.stderr
    assert orjson.loads(status.stdout)["replays"] == replays
    child = orjson.loads((await asyncio.to_thread(_cli, stack, "status", replays[2], "--json")).stdout)
    assert child["replay_of"] == source


async def test_replay_with_an_input_patch(stack: Running) -> None:
    version = stack.publish(DIAMOND)
    source = await stack.start(version, {"n": 1})
    await stack.finished(source)
    whole = await _replay(stack, source, input_patch={"n": 5})
    assert whole["input"] == {"n": 5}
    assert (await stack.finished(whole["execution_id"])).output == {"a": 5, "b": 10, "c": 10, "d": 20}
    # from c: a and b keep the outputs recorded with n=1, c and d see the patched input
    part = await _replay(stack, source, from_step="c", input_patch={"n": 5})
    assert (await stack.finished(part["execution_id"])).output == {"a": 1, "b": 2, "c": 6, "d": 8}

    head = stack.stack.store.head()
    for bad, path in (({"n": "five"}, "input.n"), ({"n": None}, "input")):
        with pytest.raises(ReplayError) as err:
            await _replay(stack, source, input_patch=bad)
        assert err.value.code == "bad_input" and err.value.exit_code == 2
        assert [p.path for p in err.value.problems] == [path]
    assert stack.stack.store.head() == head  # nothing stored
    cli = await asyncio.to_thread(_cli, stack, "replay", source, "--input-patch", '{"n": "five"}', "--json")
    assert cli.returncode == 2 and "input.n" in cli.stderr and cli.stdout == ""
    assert stack.stack.store.head() == head


async def test_a_dry_run_changes_nothing(stack: Running) -> None:
    version = stack.publish(DIAMOND)
    source = await stack.start(version, {"n": 2})
    await stack.finished(source)
    await asyncio.sleep(0.3)  # let the projector settle; its own writes are not events
    head = stack.stack.store.head()
    plan = await _replay(stack, source, from_step="c", input_patch={"n": 3}, dry_run=True)
    assert plan["dry_run"] and plan["reuse"] == ["a", "b"] and plan["run"] == ["c", "d"]
    assert plan["execution_id"] is None and plan["input"] == {"n": 3}
    cli = await asyncio.to_thread(_cli, stack, "replay", source, "--from-step", "b", "--dry-run", "--json")
    assert cli.returncode == 0, cli.stderr
    shown = orjson.loads(cli.stdout)
    assert shown["reuse"] == ["a", "c"] and shown["run"] == ["b", "d"]
    bulk = await asyncio.to_thread(bulk_replay, stack.stack.store, "workflow=diamond", dry_run=True)
    assert bulk["would_start"] == 1 and bulk["started"] == 0
    assert stack.stack.store.head() == head
    with stack.stack.store.transaction() as tx:
        assert get_execution(tx, source)["replays"] == []


async def test_bulk_replay_twice_starts_nothing_new(stack: Running) -> None:
    store = stack.stack.store
    version = stack.publish(CHECKED)
    failing = [await stack.start(version, {"n": -i}) for i in range(3)]
    fine = [await stack.start(version, {"n": i + 1}) for i in range(2)]
    for eid in failing + fine:
        await stack.finished(eid)
    first = await asyncio.to_thread(bulk_replay, store, "workflow=checked,status=failed")
    assert (first["total"], first["started"], first["skipped"], first["failed"]) == (3, 3, 0, 0)
    assert {it["source"] for it in first["items"]} == set(failing)
    for it in first["items"]:
        assert it["execution_id"] == replay_id("checked", first["operation_id"], it["source"])
        assert (await stack.finished(it["execution_id"])).status == "failed"  # same input: fails again
    # again: the replays fail too and match the filter, but are this operation's own
    second = await asyncio.to_thread(bulk_replay, store, "workflow=checked,status=failed")
    assert second["operation_id"] == first["operation_id"]
    assert (second["total"], second["started"], second["skipped"]) == (3, 0, 3)
    # a different operation (a fix in the input) is a new set of replays, once
    cli = await asyncio.to_thread(_cli, stack, "replay", "--filter", "workflow=checked,status=failed,limit=3",
                                  "--input-patch", '{"n": 7}', "--operation-id", "fix-1", "--json")
    assert cli.returncode == 0, cli.stderr
    fixed = orjson.loads(cli.stdout)
    assert (fixed["operation_id"], fixed["started"]) == ("fix-1", 3)
    for it in fixed["items"]:
        assert (await stack.finished(it["execution_id"])).output == 7
    again = orjson.loads((await asyncio.to_thread(
        _cli, stack, "replay", "--filter", "workflow=checked,status=failed,limit=3", "--input-patch", '{"n": 7}',
        "--operation-id", "fix-1", "--json")).stdout)
    assert (again["started"], again["skipped"]) == (0, 3)
    counted = await asyncio.to_thread(bulk_replay, store, "workflow=checked", dry_run=True, operation_id="count")
    assert counted["total"] == 5 + 3 + 3  # originals + two operations' replays, nothing more
    with store.transaction() as tx:
        for eid in failing:
            assert len(get_execution(tx, eid)["replays"]) == 2
    bad = await asyncio.to_thread(_cli, stack, "replay", "--filter", "colour=red")
    assert bad.returncode == 2 and "unknown key" in bad.stderr


async def test_replay_onto_another_version(stack: Running) -> None:
    v1 = stack.publish(DIAMOND)
    source = await stack.start(v1, {"n": 1})
    await stack.finished(source)
    step_e = '  - {id: e, type: transform, needs: [d], with: {expression: "sum([d, `100`])"}, ' \
        'input: {d: "${{ steps.d.output }}"}}\n'
    v2 = stack.publish(DIAMOND.replace("output:", step_e + "output:"))
    assert v2.version == 2
    result = await _replay(stack, source, from_step="d", version="latest")
    assert (result["version"], result["reuse"], result["run"]) == (2, ["a", "b", "c"], ["d", "e"])
    state = await stack.finished(result["execution_id"])
    assert state.status == "completed" and state.workflow_version == 2 and state.steps["e"].output == 104
    same = await _replay(stack, source, version="1", dry_run=True)
    assert same["version"] == 1
    for kw, words in (({"version": 9}, "no version 9"), ({"version": "newest"}, "same, latest"),
                      ({"from_step": "e"}, "has no step 'e'"), ({"from_step": "zz", "version": 2}, "has no step")):
        with pytest.raises(ReplayError) as err:
            await _replay(stack, source, **kw)
        assert err.value.code == "bad_input" and words in str(err.value)
    with pytest.raises(ReplayError) as err:
        await _replay(stack, str(uuid.uuid4()))
    assert err.value.code == "not_found" and err.value.exit_code == 1
    missing = await asyncio.to_thread(_cli, stack, "replay", str(uuid.uuid4()))
    assert missing.returncode == 3  # not found: the exit-code rule of weft/cli/common.py
