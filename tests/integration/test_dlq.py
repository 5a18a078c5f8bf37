"""Dead letters of steps, end to end: a real stack (NATS + SQLite/PostgreSQL) in this
process, and the real `weft dlq` command line in subprocesses against it.

A step fails for good -> it is in `weft dlq list` -> `show` explains it -> the cause
is fixed -> `reprocess` completes the execution, with one idempotency key across
every attempt; a patched reprocess; discard with its audit; filters, clusters,
watch and the open-dead-letters metric.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.deadletters.metrics import OpenDeadLettersGauge
from tests.support import Running, assert_applied_once, stack_up, wait_until
from tests.integration.steps import FLAKY, POSITIVE

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture
async def stack(tmp_path: Path, db_url: str, broker_url: str):
    async with stack_up(tmp_path, db_url, broker_url) as running:
        yield running


class Cli:
    """`python -m weft ...` against the running stack, without blocking its event loop."""

    def __init__(self, running: Running, home: Path):
        s = running.stack.settings
        self.env = {
            **os.environ, "WEFT_HOME": str(home), "WEFT_DATABASE_URL": s.database_url or "",
            "WEFT_BROKER_URL": s.broker() or "", "WEFT_NAMESPACE": s.namespace, "WEFT_USER": "tester",
            "PYTHONPATH": str(ROOT), "COLUMNS": "160",
        }
        self.env.pop("WEFT_CRASH_AT", None)

    async def __call__(self, *args: str, expect: int | None = 0) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "weft", *args, env=self.env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
        code = proc.returncode
        assert expect is None or code == expect, f"weft {' '.join(args)} exited {code}, not {expect}:\n{out.decode()}\n{err.decode()}"
        return code, out.decode(), err.decode()

    async def json(self, *args: str, expect: int | None = 0) -> Any:
        _, out, _ = await self(*args, "--json", expect=expect)
        return orjson.loads(out)


async def _failed(stack: Running, text: str, data: Any) -> str:
    version = await asyncio.to_thread(stack.publish, text)
    eid = await stack.start(version, data)
    state = await stack.finished(eid)
    assert state.status == "failed", state
    return eid


async def _open_letter(cli: Cli, execution_id: str) -> dict[str, Any]:
    async def find() -> Any:
        rows = await cli.json("dlq", "list")
        return next((r for r in rows if r["execution_id"] == execution_id), None)

    return await wait_until(find, timeout=20, interval=0.3, what="the dead letter to be listed")


async def test_failing_step_is_dead_lettered_fixed_and_reprocessed(stack: Running, tmp_path: Path) -> None:
    cli = Cli(stack, tmp_path)
    flag, log = tmp_path / "backend-up", tmp_path / "attempts.log"
    eid = await _failed(stack, FLAKY, {"order": "A-1", "flag": str(flag), "log": str(log)})
    state = await asyncio.to_thread(stack.reader.load, eid, fresh=True)
    assert state.steps["charge"].status == "dead_lettered" and state.steps["done"].status == "pending"

    letter = await _open_letter(cli, eid)
    assert letter["kind"] == "retries_exhausted" and letter["status"] == "open"
    assert (letter["workflow"], letter["step_id"], letter["attempt"], letter["delivered"]) == ("flaky-orders", "charge", 3, 3)
    assert letter["error_type"] == "ConnectionError" and "backend unreachable" in letter["error_message"]

    shown = await cli.json("dlq", "show", letter["id"][:8])  # a short id is enough
    assert shown["id"] == letter["id"]
    assert shown["payload"] == {"order": "A-1", "flag": str(flag), "log": str(log)}
    assert "ConnectionError: backend unreachable" in shown["traceback"] and "steps.py" in shown["traceback"]
    assert [e["type"] for e in shown["history"]][-2:] == ["StepDeadLettered", "ExecutionFailed"]
    assert shown["hint"] == f"weft history {eid}"
    assert shown["details"]["idempotency_key"] == f"{eid}:charge"
    _, text, _ = await cli("dlq", "show", letter["id"])
    assert "backend unreachable" in text and f"weft history {eid}" in text and "Traceback" in text

    flag.touch()  # the cause is fixed
    outcome = await cli.json("dlq", "reprocess", letter["id"], "--why", "backend is back")
    assert [(o["id"], o["outcome"], o["attempt"]) for o in outcome] == [(letter["id"], "reprocessed", 4)]
    state = await stack.finished(eid)
    assert state.status == "completed", state.error
    assert state.output == {"ok": True, "order": "A-1"}

    attempts = [line.split() for line in log.read_text().splitlines()]
    assert [int(a) for _, a in attempts] == [1, 2, 3, 4]
    assert {k for k, _ in attempts} == {f"{eid}:charge"}  # one idempotency key across every attempt

    # Twice gives one new attempt, not two; the second run says so and stores nothing.
    head = await asyncio.to_thread(stack.stack.store.head)
    again = await cli.json("dlq", "reprocess", letter["id"])
    assert [o["outcome"] for o in again] == ["already_reprocessed"]
    history = await stack.history(eid)
    assert [e.attempt for e in history if e.type == "StepScheduled" and e.step_id == "charge"] == [1, 2, 3, 4]
    assert sum(1 for e in history if e.type == "StepReprocessRequested") == 1
    assert_applied_once(history)
    assert await asyncio.to_thread(stack.stack.store.head) == head

    after = (await cli.json("dlq", "list", "--status", "reprocessed"))[0]
    assert (after["id"], after["actor"], after["action_reason"]) == (letter["id"], "tester", "backend is back")
    assert await cli.json("dlq", "list") == []  # nothing open any more


async def test_reprocess_with_a_patched_input(stack: Running, tmp_path: Path) -> None:
    cli = Cli(stack, tmp_path)
    eid = await _failed(stack, POSITIVE, {"n": -3})
    letter = await _open_letter(cli, eid)
    assert letter["kind"] == "retries_exhausted" and "got -3" in letter["error_message"]
    head = await asyncio.to_thread(stack.stack.store.head)

    # Bad patches are refused before anything is stored.
    _, _, err = await cli("dlq", "reprocess", letter["id"], "--patch", "[1, 2]", expect=2)
    assert "JSON object" in err
    _, _, err = await cli("dlq", "reprocess", letter["id"], "--patch", "{not json", expect=2)
    assert "--patch" in err
    assert await asyncio.to_thread(stack.stack.store.head) == head

    dry = await cli.json("dlq", "reprocess", letter["id"], "--patch", '{"n": 5}', "--dry-run")
    assert dry[0]["outcome"] == "would_reprocess" and dry[0]["preview"] == {"n": 5}
    assert await asyncio.to_thread(stack.stack.store.head) == head

    done = await cli.json("dlq", "reprocess", letter["id"], "--patch", '{"n": 5}')
    assert done[0]["outcome"] == "reprocessed"
    state = await stack.finished(eid)
    assert state.status == "completed" and state.output == 5
    history = await stack.history(eid)
    scheduled = [e for e in history if e.type == "StepScheduled"]
    assert [(e.attempt, e.input, e.reason) for e in scheduled] == [(1, {"n": -3}, "ready"), (2, {"n": 5}, "reprocess")]
    assert next(e for e in history if e.type == "StepReprocessRequested").patch == {"n": 5}


async def test_discard_is_recorded_with_who_and_why(stack: Running, tmp_path: Path) -> None:
    cli = Cli(stack, tmp_path)
    eid = await _failed(stack, POSITIVE, {"n": 0})
    letter = await _open_letter(cli, eid)
    await cli("dlq", "discard", letter["id"], expect=2)  # a reason is required
    out = await cli.json("dlq", "discard", letter["id"], "--reason", "test order, not real")
    assert out[0]["outcome"] == "discarded"
    again = await cli.json("dlq", "discard", letter["id"], "--reason", "twice")
    assert again[0]["outcome"] == "already_discarded"
    refused = await cli.json("dlq", "reprocess", letter["id"], expect=1)
    assert refused[0]["outcome"] == "already_discarded"

    rows = await cli.json("dlq", "list", "--status", "discarded")
    assert [(r["id"], r["actor"], r["action_reason"]) for r in rows] == [(letter["id"], "tester", "test order, not real")]
    acts = (await cli.json("dlq", "show", letter["id"]))["acts"]
    assert [(a["type"], a["by"], a["why"]) for a in acts] == [("DeadLetterDiscarded", "tester", "test order, not real")]
    state = await asyncio.to_thread(stack.reader.load, eid, fresh=True)
    assert state.status == "failed"  # a discard never touches the execution
    await cli("dlq", "show", "ffffffff", expect=3)  # not found (weft/cli/common.py)


async def test_list_filters_clusters_and_the_metric(stack: Running, tmp_path: Path) -> None:
    cli = Cli(stack, tmp_path)
    ids = [await _failed(stack, POSITIVE, {"n": n}) for n in (-1, -2, -30)]
    refuse = "name: refuses\nsteps: [{id: r, type: python, with: {callable: 'tests.integration.steps:refuse'}}]\n"
    other = await _failed(stack, refuse, {})
    await wait_until(lambda: _count(cli, 4), timeout=20, interval=0.3)

    assert {r["execution_id"] for r in await cli.json("dlq", "list", "--workflow", "needs-positive")} == set(ids)
    nonretry = await cli.json("dlq", "list", "--kind", "non_retryable")
    assert [(r["execution_id"], r["error_type"]) for r in nonretry] == [(other, "NonRetryableError")]
    assert len(await cli.json("dlq", "list", "--kind", "step")) == 4
    assert len(await cli.json("dlq", "list", "--error-contains", "MUST BE POSITIVE")) == 3
    assert len(await cli.json("dlq", "list", "--step", "r")) == 1
    assert await cli.json("dlq", "list", "--since", "2999-01-01") == []
    assert len(await cli.json("dlq", "list", "--since", "1h", "--until", "2999-01-01T00:00:00Z")) == 4
    await cli("dlq", "list", "--since", "yesterday-ish", expect=2)
    await cli("dlq", "list", "--status", "closed", expect=2)
    await cli("dlq", "list", "--kind", "nonsense", expect=2)

    groups = await cli.json("dlq", "list", "--group-by", "error")
    assert sorted(g["count"] for g in groups) == [1, 3]  # got -1, -2, -30: one failure, three times
    big = next(g for g in groups if g["count"] == 3)
    assert big["error"] == "n must be positive, got <n>" and big["workflows"] == ["needs-positive"]

    provider = MeterProvider(metric_readers=[reader := InMemoryMetricReader()])
    OpenDeadLettersGauge(stack.stack.store, provider.get_meter("test"))
    assert _gauge(reader) == {("retries_exhausted", "needs-positive"): 3, ("non_retryable", "refuses"): 1}
    await cli("dlq", "discard", "--workflow", "needs-positive", "--reason", "bad test data")
    await wait_until(lambda: _gauge(reader).get(("retries_exhausted", "needs-positive")) == 0, timeout=10)
    assert _gauge(reader)[("non_retryable", "refuses")] == 1
    stats = await cli.json("dlq", "stats")
    assert stats["by_status"] == {"open": 1, "reprocessed": 0, "discarded": 3}
    _, text, _ = await cli("dlq", "stats", "--prometheus")
    assert 'weft_dlq_open{kind="non_retryable",workflow="refuses"} 1' in text
    provider.shutdown()


async def _count(cli: Cli, n: int) -> bool:
    return len(await cli.json("dlq", "list", "--status", "all")) >= n


def _gauge(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    data = reader.get_metrics_data()
    out: dict[tuple[str, str], int] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "weft.dlq.open":
                    for p in metric.data.data_points:
                        out[(p.attributes["kind"], p.attributes["workflow"])] = int(p.value)
    return out


async def test_watch_follows_new_dead_letters(stack: Running, tmp_path: Path) -> None:
    cli = Cli(stack, tmp_path)
    await _failed(stack, POSITIVE, {"n": -1})  # an old one: watch shows only new ones
    await wait_until(lambda: _count(cli, 1), timeout=20, interval=0.3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "weft", "dlq", "watch", "--json", "--interval", "0.1", env=cli.env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        ready = await asyncio.wait_for(proc.stderr.readline(), timeout=60)  # type: ignore[union-attr]
        assert b"watching" in ready  # it has taken its bearings: what comes now is new
        eid = await _failed(stack, POSITIVE, {"n": -2})
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)  # type: ignore[union-attr]
        seen = orjson.loads(line)
        assert (seen["execution_id"], seen["kind"], seen["status"]) == (eid, "retries_exhausted", "open")
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), timeout=15)
    assert proc.returncode == 0


async def test_input_errors_are_dead_lettered_and_cannot_be_patched(stack: Running, tmp_path: Path) -> None:
    cli = Cli(stack, tmp_path)
    text = """
name: bad-map
steps:
  - {id: each, type: noop, map: "${{ input.items }}"}
"""
    eid = await _failed(stack, text, {"items": "not a list"})
    letter = await _open_letter(cli, eid)
    assert (letter["kind"], letter["attempt"], letter["error_type"]) == ("input_error", 0, "ExpressionError")
    shown = await cli.json("dlq", "show", letter["id"])
    assert shown["payload"] == {"items": "not a list"}  # what the mapping ran on
    _, _, err = await cli("dlq", "reprocess", letter["id"], "--patch", '{"items": [1]}', expect=2)
    assert "no input to patch" in err


async def test_reprocess_needs_a_selection_and_known_ids(stack: Running, tmp_path: Path) -> None:
    cli = Cli(stack, tmp_path)
    await cli("dlq", "reprocess", expect=2)
    await cli("dlq", "reprocess", str(uuid.uuid4()), expect=3)  # not found
    await cli("dlq", "reprocess", "--filter", "colour=red", expect=2)
    assert await cli.json("dlq", "reprocess", "--all") == []  # nothing open: nothing to do, success

