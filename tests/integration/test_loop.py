"""The core loop end to end, in one process, over a real NATS and a real database:
trigger -> event store -> relay -> worker -> orchestrator -> projections."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import orjson
import pytest

from contracts.subjects import DLQ_STREAM, result_subject, step_subject
from services.broker import OutMessage
from services.orchestrator.decide import Cancel, Pause, Reprocess, Resume
from tests.support import Running, assert_applied_once, stack_up, up_stack, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture
async def stack(tmp_path: Path, db_url: str, broker_url: str):
    async with stack_up(tmp_path, db_url, broker_url) as running:
        yield running


async def test_example_workflow_completes_with_retries(stack: Running) -> None:
    version = stack.publish((ROOT / "examples/order.yaml").read_text())
    eid = await stack.start(version, {"order_id": "A-1", "items": ["apple", "pear", "fig"]})
    state = await stack.finished(eid)
    assert state.status == "completed", state.error
    assert state.output == {
        "order": "A-1",
        "summary": {"parcels": ["P0-1", "P1-2", "P2-1"], "count": 3},
    }
    history = await stack.history(eid)
    assert_applied_once(history)
    failed = [e for e in history if e.type == "StepFailed"]
    assert [(e.step_id, e.item, e.error_type) for e in failed] == [("ship_each", 1, "ConnectionError")]
    retry = [e for e in history if e.type == "StepScheduled" and e.reason == "retry"]
    assert retry and retry[0].not_before is not None
    # every attempt of one map item had one idempotency key
    keys = {e.idempotency_key for e in history if e.type == "StepScheduled" and e.item == 1}
    assert keys == {f"{eid}:ship_each#1"}


async def test_fan_out_fan_in_and_skip(stack: Running) -> None:
    text = """
name: fan
steps:
  - {id: split, type: transform, with: {expression: "range"}, input: {range: [0,1,2,3,4,5,6,7,8,9]}}
  - {id: each, type: transform, needs: [split], map: "${{ steps.split.output }}", input: {n: "${{ item }}"}, with: {expression: "n"}}
  - {id: never, type: noop, needs: [split], when: "${{ input.flag }}"}
  - {id: after_never, type: noop, needs: [never]}
  - {id: join, type: transform, needs: [each, after_never], with: {expression: "length(xs)"}, input: {xs: "${{ steps.each.output }}"}}
output: {items: "${{ steps.each.output }}", count: "${{ steps.join.output }}"}
"""
    eid = await stack.start(stack.publish(text), {"flag": False})
    state = await stack.finished(eid)
    assert state.status == "completed", state.error
    assert state.output == {"items": list(range(10)), "count": 10}
    assert state.steps["never"].status == "skipped" and state.steps["after_never"].status == "skipped"


async def test_dead_letter_then_reprocess_with_patch(stack: Running) -> None:
    text = """
name: needs-fix
steps:
  - id: check
    type: transform
    with: {expression: "to_number(qty)"}
    input: {qty: "${{ input.qty }}"}
  - id: fail_unless
    type: python
    needs: [check]
    with: {callable: "tests.integration.steps:positive"}
    input: {n: "${{ steps.check.output }}"}
    retry: {max_attempts: 2, initial_delay: 0.05}
"""
    eid = await stack.start(stack.publish(text), {"qty": "-3"})
    state = await stack.finished(eid)
    assert state.status == "failed"
    assert state.steps["fail_unless"].status == "dead_lettered"
    await asyncio.to_thread(stack.stack.executions.command, eid, Reprocess(step_id="fail_unless", patch={"n": 3}))
    state = await stack.finished(eid)
    assert state.status == "completed", state.error
    history = await stack.history(eid)
    attempts = [e.attempt for e in history if e.type == "StepScheduled" and e.step_id == "fail_unless"]
    assert attempts == [1, 2, 3]
    assert_applied_once(history)


async def test_pause_resume_and_cancel(stack: Running) -> None:
    text = """
name: slow
steps:
  - {id: a, type: sleep, with: {seconds: 0.5}}
  - {id: b, type: noop, needs: [a]}
"""
    version = stack.publish(text)
    eid = await stack.start(version)
    await asyncio.to_thread(stack.stack.executions.command, eid, Pause())
    # a finishes while paused (on Kafka, after the consumer groups formed); b must not be scheduled
    async def a_done() -> object:
        s = await asyncio.to_thread(stack.reader.load, eid, fresh=True)
        return s if s.steps["a"].status == "succeeded" else None

    await wait_until(a_done, timeout=15)
    await asyncio.sleep(0.3)  # time in which b would have been scheduled, were pausing broken
    state = await asyncio.to_thread(stack.reader.load, eid, fresh=True)
    assert state.status == "paused"
    assert state.steps["a"].status == "succeeded" and state.steps["b"].status == "pending"
    await asyncio.to_thread(stack.stack.executions.command, eid, Resume())
    assert (await stack.finished(eid)).status == "completed"

    other = await stack.start(version)
    await asyncio.to_thread(stack.stack.executions.command, other, Cancel(why="test"))
    await wait_until(lambda: any(e.type == "StepResultIgnored" for e in stack.reader.history(other)), timeout=10)
    history = await stack.history(other)
    ignored = [e for e in history if e.type == "StepResultIgnored"]
    assert ignored[0].reason == "execution cancelled"
    assert (await asyncio.to_thread(stack.reader.load, other, fresh=True)).status == "cancelled"


async def test_poison_messages_are_dead_lettered_and_loop_survives(stack: Running) -> None:
    transport = stack.stack.transport
    await transport.publish(OutMessage(result_subject("garbage"), b"\x00not json", msg_id="poison-1"))
    await transport.publish(OutMessage(step_subject("noop"), b'{"execution_id": 1}', msg_id="poison-2"))
    await transport.publish(
        OutMessage(result_subject("x"), orjson.dumps({
            "execution_id": str(uuid.uuid4()), "step_id": "a", "attempt": 1, "status": "succeeded"}), msg_id="poison-3")
    )
    version = stack.publish("name: healthy\nsteps: [{id: a, type: noop}]\n")
    eid = await stack.start(version)
    assert (await stack.finished(eid)).status == "completed"
    consumer = await transport.consumer(DLQ_STREAM, f"check{uuid.uuid4().hex[:6]}")
    letters = []

    async def three() -> bool:
        letters.extend(await consumer.fetch(10, timeout=0.5))
        return len(letters) >= 3

    await wait_until(three, timeout=15)
    by_payload = {m.data: m for m in letters}
    assert b"\x00not json" in by_payload
    assert by_payload[b"\x00not json"].headers["Weft-Dlq-Reason"].startswith("undecodable StepResult")
    assert {m.subject for m in letters} >= {"weft.dlq.poison", "weft.dlq.unknown_task"}
    await consumer.close()


async def test_two_orchestrators_share_the_results(tmp_path: Path, db_url: str, broker_url: str) -> None:
    one = await up_stack(tmp_path / "one", db_url, broker_url)
    ns = one.stack.settings.namespace
    two = await up_stack(tmp_path / "two", db_url, broker_url, parts=("orchestrator",), namespace=ns)
    try:
        version = one.publish((ROOT / "examples/linear5.yaml").read_text())
        ids = [await one.start(version) for _ in range(40)]
        for eid in ids:
            state = await one.finished(eid, timeout=60)
            assert state.status == "completed"
            assert_applied_once(await one.history(eid))
        # results were shared between the two consumers of one durable
        assert one.stack.consumer.applied + two.stack.consumer.applied >= 200
    finally:
        for r in (two, one):
            r.stop.set()
            await asyncio.wait_for(r.task, timeout=30)


async def test_broker_restart_mid_flight(tmp_path: Path, db_url: str) -> None:
    """The broker goes away and comes back: every execution still finishes, once."""
    from services.broker.nats_server import NatsServer

    server = NatsServer(store_dir=tmp_path / "nats").start()
    running = await up_stack(tmp_path, db_url, server.url, ack_wait=3.0)
    try:
        version = running.publish((ROOT / "examples/linear5.yaml").read_text())
        ids = [await running.start(version) for _ in range(20)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.restart)
        more = [await running.start(version) for _ in range(5)]
        for eid in ids + more:
            assert (await running.finished(eid, timeout=90)).status == "completed"
            assert_applied_once(await running.history(eid))
    finally:
        running.stop.set()
        await asyncio.wait_for(running.task, timeout=30)
        server.stop()


async def test_kafka_restart_mid_flight(tmp_path: Path, db_url: str) -> None:
    """The same on Kafka. Tansu keeps its data in memory, so this needs a real Kafka that survives a
    restart: WEFT_TEST_KAFKA_URL, and WEFT_TEST_KAFKA_RESTART, a shell command that restarts it and
    returns once it is back (e.g. `docker restart kafka`)."""
    url, restart = os.environ.get("WEFT_TEST_KAFKA_URL"), os.environ.get("WEFT_TEST_KAFKA_RESTART")
    if not (url and restart):
        pytest.skip("needs a durable Kafka that can be restarted: set WEFT_TEST_KAFKA_URL and WEFT_TEST_KAFKA_RESTART")
    running = await up_stack(tmp_path, db_url, url, ack_wait=3.0)
    try:
        version = running.publish((ROOT / "examples/linear5.yaml").read_text())
        ids = [await running.start(version) for _ in range(20)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(subprocess.run, restart, shell=True, check=True, timeout=120)
        more = [await running.start(version) for _ in range(5)]
        for eid in ids + more:
            assert (await running.finished(eid, timeout=180)).status == "completed"
            assert_applied_once(await running.history(eid))
    finally:
        running.stop.set()
        await asyncio.wait_for(running.task, timeout=30)
