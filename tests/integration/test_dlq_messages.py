"""Dead letters of broker messages: poison on the results and steps subjects, MaxDeliver,
triggers; each lands in the DLQ and the view with its payload intact, and can be
republished (patched and re-validated) to where it came from.

Throughput: the test below checks a healthy workload keeps most of its throughput
beside a flood of garbage with a deliberately loose bound (to stay stable on a
busy CI machine); `bench/dlq.py` measures the same comparison properly (the issue asks for >= 90%; README has what it measures).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from contracts import deadletters as dl
from contracts.messages import StepResult
from contracts.subjects import RESULTS_STREAM, TRIGGERS_STREAM, result_subject, step_subject, trigger_subject
from services.broker import OutMessage
from services.deadletters import Actions, Filters, PatchError, find, list_dead_letters, refresh
from tests.support import Running, finished_all, stack_up, wait_until

pytestmark = pytest.mark.integration

LINEAR = """
name: healthy
steps:
  - {id: a, type: noop}
  - {id: b, type: noop, needs: [a]}
  - {id: c, type: noop, needs: [b]}
"""


def _rows(running: Running, **filters: Any) -> list[dict[str, Any]]:
    store = running.stack.store
    refresh(store)
    with store.transaction() as tx:
        return list_dead_letters(tx, Filters(**filters), limit=100_000)


async def _letters(running: Running, n: int, timeout: float = 30, **filters: Any) -> list[dict[str, Any]]:
    async def enough() -> Any:
        rows = await asyncio.to_thread(_rows, running, **filters)
        return rows if len(rows) >= n else None

    return await wait_until(enough, timeout=timeout, interval=0.1, what=f"{n} dead letters")


async def test_poison_lands_in_the_dlq_intact_and_consumers_keep_running(tmp_path: Path, db_url: str, broker_url: str) -> None:
    async with stack_up(tmp_path, db_url, broker_url) as running:
        transport = running.stack.transport
        unknown = StepResult(execution_id=str(uuid.uuid4()), step_id="a", attempt=1, status="succeeded", output=1)
        garbage = {
            "bin": (result_subject("x"), b"\x00\xff\xfe binary \x80"),
            "schema": (result_subject("y"), b'{"execution_id": 1}'),
            "text": (step_subject("noop"), b"this is not a command"),
            "step-schema": (step_subject("python"), orjson.dumps({"execution_id": "e", "step_id": "s"})),
            "unknown": (result_subject(unknown.execution_id), unknown.encode()),
        }
        for name, (subject, data) in garbage.items():
            await transport.publish(OutMessage(subject, data, msg_id=f"garbage-{name}", headers={"X-Test": name}))
        version = await asyncio.to_thread(running.publish, LINEAR)
        eid = await running.start(version)
        assert (await running.finished(eid)).status == "completed"  # the consumers kept running

        rows = await _letters(running, len(garbage), kind="message")
        by_test = {r["headers"].get("X-Test"): r for r in rows}
        assert set(by_test) == set(garbage)
        for name, (subject, data) in garbage.items():
            row = by_test[name]
            assert dl.decode_payload(row["payload"], row["payload_encoding"]) == data, name  # byte for byte
            assert row["source_subject"] == subject and row["status"] == "open" and row["delivered"] == 1
        assert by_test["bin"]["payload_encoding"] == "base64"
        assert by_test["unknown"]["kind"] == "unknown_task"
        assert (by_test["unknown"]["execution_id"], by_test["unknown"]["step_id"]) == (unknown.execution_id, "a")
        assert {by_test[n]["kind"] for n in ("bin", "schema", "text", "step-schema")} == {"poison"}
        assert by_test["schema"]["error_message"].startswith("undecodable StepResult")
        assert by_test["step-schema"]["error_message"].startswith("undecodable StepReady")
        assert running.stack.deadletters.ingester.counts["recorded"] == len(garbage)


async def _run_healthy(running: Running, version: Any, n: int) -> float:
    """Executions/s of n healthy executions started at once, until the last completed."""
    store = running.stack.store
    position = await asyncio.to_thread(store.head)
    start = time.perf_counter()
    ids = await asyncio.to_thread(running.stack.executions.start_many, version, [{}] * n)
    await finished_all(store, ids, "ExecutionCompleted", since=position, interval=0.02)
    return n / (time.perf_counter() - start)


async def test_healthy_throughput_beside_a_poison_flood(tmp_path: Path, pg_url: str, nats_url: str) -> None:
    """Alternating rounds, best of each: other work on a shared machine only slows rounds down,
    and the bound is loose on purpose; bench/dlq.py measures the >= 90% of the issue."""
    async with stack_up(tmp_path, pg_url, nats_url) as running:
        transport = running.stack.transport
        version = await asyncio.to_thread(running.publish, LINEAR)
        await _run_healthy(running, version, 50)  # warm up
        n, flood, alone, beside = 150, 150, [], []
        for r in range(2):
            alone.append(await _run_healthy(running, version, n))

            async def poison(r: int = r, pace: float = n / alone[-1]) -> None:
                for i in range(0, flood, 10):  # an even pace over about one baseline run
                    await transport.publish_many([
                        OutMessage(result_subject("flood") if j % 2 else step_subject("noop"), b"\xde\xad" + str(j).encode(),
                                   msg_id=f"flood-{r}-{j}")
                        for j in range(i, i + 10)
                    ])
                    await asyncio.sleep(pace * 10 / flood)

            flooding = asyncio.create_task(poison())
            beside.append(await _run_healthy(running, version, n))
            await flooding
        ratio = max(beside) / max(alone)
        print(f"healthy throughput: {max(alone):.0f}/s alone, {max(beside):.0f}/s beside {flood} poison messages "
              f"per {n} executions ({ratio:.0%}); rounds {alone} / {beside}")
        assert ratio >= 0.6, f"throughput fell to {ratio:.0%} of the baseline"
        rows = await _letters(running, 2 * flood, timeout=60, kind="poison")
        assert len(rows) == 2 * flood  # every one of them, once


@pytest.fixture
async def service(tmp_path: Path, pg_url: str, nats_url: str):
    """The dead-letter service alone (no orchestrator or workers to take the messages)."""
    async with stack_up(tmp_path, pg_url, nats_url, parts=("deadletters",)) as running:
        yield running


async def test_max_deliver_is_captured_moved_and_republished(service: Running) -> None:
    transport = service.stack.transport
    subject = result_subject("stuck")
    payload = orjson.dumps({"execution_id": "stuck", "anything": [1, 2, 3]})
    await transport.publish(OutMessage(subject, payload, msg_id="stuck-1", headers={"X-Trace": "t-1"}))
    # A consumer that takes the message and never acks it, until JetStream gives up on it.
    stuck = await transport.consumer(RESULTS_STREAM, "stuck", ack_wait=0.3, max_deliver=2)
    seqs = set()

    async def captured() -> Any:
        seqs.update(m.stream_seq for m in await stuck.fetch(1, timeout=0.2))
        rows = await asyncio.to_thread(_rows, service, kind="max_deliver")
        return rows[0] if rows else None

    row = await wait_until(captured, timeout=30, interval=0.05, what="the MaxDeliver dead letter")
    assert dl.decode_payload(row["payload"], row["payload_encoding"]) == payload
    assert (row["source_subject"], row["delivered"], row["headers"]["X-Trace"]) == (subject, 2, "t-1")
    assert "MaxDeliver" in row["error_message"] and row["error_type"] == "MaxDeliverExceeded"
    assert await transport.get_message(RESULTS_STREAM, seqs.pop()) is None  # moved out of the work queue

    actions = Actions(service.stack.store, transport)
    outcome = await actions.reprocess(row, by="tester", why="consumer fixed")
    assert (outcome.outcome, outcome.detail) == ("republished", f"to {subject}")
    again = await actions.reprocess(row, by="tester")
    assert again.outcome == "already_reprocessed"
    got = await wait_until(lambda: stuck.fetch(1, timeout=0.5), timeout=10, what="the republished message")
    assert got[0].data == payload and got[0].headers["X-Trace"] == "t-1"
    assert got[0].headers["Weft-Reprocessed-From"] == row["id"]
    await got[0].ack()
    await stuck.close()
    assert service.stack.deadletters.capture.captured == 1


async def test_trigger_dead_letters_republish_only_valid_patches(service: Running) -> None:
    transport = service.stack.transport
    subject = trigger_subject("order.created")
    event = {"specversion": "1.0", "id": "evt-1", "source": "shop", "type": "order.created", "data": {"qty": "x"}}
    await transport.dead_letter(
        "trigger_unroutable", orjson.dumps(event), reason="no workflow subscribes to order.created",
        source_subject=subject, msg_id="dlq:WEFT_TRIGGERS:1",
    )
    (row,) = await _letters(service, 1, kind="trigger_unroutable")
    assert row["error_type"] == "UnroutableTrigger" and row["details"]["event_type"] == "order.created"
    actions = Actions(service.stack.store, transport)
    with pytest.raises(PatchError, match="CloudEvent"):
        actions.patched(row, {"type": "bad type!"})
    with pytest.raises(PatchError, match="JSON object"):
        actions.patched(row, [1])
    with service.stack.store.transaction() as tx:
        assert find(tx, row["id"][:6])[0]["id"] == row["id"]
    watcher = await transport.consumer(TRIGGERS_STREAM, "watcher")
    outcome = await actions.reprocess(row, patch={"data": {"qty": 2}}, by="tester")
    assert outcome.outcome == "republished"
    got = await wait_until(lambda: watcher.fetch(10, timeout=0.5), timeout=10)
    assert [orjson.loads(m.data)["data"] for m in got] == [{"qty": 2}] and got[0].subject == subject
    await watcher.close()
    rows = await asyncio.to_thread(_rows, service, status="reprocessed")
    assert [(r["id"], r["actor"]) for r in rows] == [(row["id"], "tester")]


async def test_a_reprocessed_trigger_that_fails_again_is_a_new_dead_letter(tmp_path: Path, db_url: str, broker_url: str) -> None:
    """Unroutable and rejected triggers are keyed by the event's (source, id): its repeats make
    one dead letter. A republish by `weft dlq reprocess` that fails again must not vanish into
    that key (the DLQ drops a duplicate id inside its window, and the reprocessed letter would
    look done): it is a new open dead letter that names the one it came from."""
    from services.triggers.publish import encode, new_event, publish

    async with stack_up(tmp_path, db_url, broker_url) as running:
        transport, triggers = running.stack.transport, running.stack.triggers
        running.publish("name: strict\non:\n  - event: order.created\ninput_schema: {type: object, required: [order_id]}\n"
                        "steps:\n  - {id: a, type: noop}\n")
        unroutable = new_event("nobody.listens", {"x": 1}, id="again-1", source="shop")
        await publish(transport, unroutable)
        await publish(transport, new_event("order.created", {"no_order_id": True}, id="again-2", source="shop"))
        firsts = await _letters(running, 2)
        assert sorted(r["kind"] for r in firsts) == ["trigger_invalid", "trigger_unroutable"]
        actions = Actions(running.stack.store, transport)
        for row in firsts:  # the cause is not fixed: both fail again
            assert (await actions.reprocess(row, patch=None, by="tester")).outcome == "republished"
        rows = await _letters(running, 4)
        first_ids = {r["id"] for r in firsts}
        new = [r for r in rows if r["id"] not in first_ids]
        assert {r["headers"].get(dl.REPROCESSED_FROM_HEADER) for r in new} == first_ids
        assert sorted(r["kind"] for r in new) == ["trigger_invalid", "trigger_unroutable"]
        assert {r["status"] for r in new} == {"open"}
        assert {r["status"] for r in rows if r["id"] in first_ids} == {"reprocessed"}
        # The event itself again (a publisher's retry after the broker's window): its own letter, not a new one.
        handled = triggers.handled
        await transport.publish(OutMessage(trigger_subject("nobody.listens"), encode(unroutable), msg_id="retry-1"))
        await wait_until(lambda: triggers.handled > handled, timeout=10)
        await asyncio.sleep(1)  # time for a dead letter to reach the view, if one had been made
        assert len(await asyncio.to_thread(_rows, running)) == 4


async def test_what_a_webhook_or_cron_tick_could_not_start_is_dead_lettered_once_per_workflow(service: Running) -> None:
    from services.triggers.ingest import Outcome
    from services.triggers.publish import dead_letter_rejected

    transport = service.stack.transport
    outcome = Outcome("accepted", "shop", "hook-1", rejected={"strict@1": "invalid input: 'order_id' is a required property",
                                                             "stricter@2": "invalid input: 'qty' is a required property"})
    payload = orjson.dumps({"id": "hook-1", "source": "shop", "type": "order.created", "data": {}})
    for _ in range(2):  # a retried request: the same two dead letters, not four
        await dead_letter_rejected(transport, outcome, payload, source_subject="webhook:/orders")
    await _letters(service, 2, kind="trigger_invalid")
    await asyncio.sleep(1)  # time for the retry's letters to arrive, had they not been deduplicated
    rows = await asyncio.to_thread(_rows, service, kind="trigger_invalid")
    assert sorted((r["headers"]["Weft-Workflow"], r["source_subject"], r["reason"]) for r in rows) == [
        ("strict@1", "webhook:/orders", "workflow strict@1: invalid input: 'order_id' is a required property"),
        ("stricter@2", "webhook:/orders", "workflow stricter@2: invalid input: 'qty' is a required property"),
    ]
    assert {dl.decode_payload(r["payload"], r["payload_encoding"]) for r in rows} == {payload}


async def test_max_deliver_on_kafka_is_dead_lettered_by_the_consumer_and_republished(
    tmp_path: Path, sqlite_url: str, kafka_url: str,
) -> None:
    """Kafka has no MaxDeliver advisory: its consumer dead-letters what it gave up on, and commits past it."""
    async with stack_up(tmp_path, sqlite_url, kafka_url, parts=("deadletters",)) as running:
        transport = running.stack.transport
        subject = result_subject("stuck")
        payload = orjson.dumps({"execution_id": "stuck", "anything": [1, 2, 3]})
        await transport.publish(OutMessage(subject, payload, msg_id="stuck-1", headers={"X-Trace": "t-1"}, key="stuck"))
        stuck = await transport.consumer(RESULTS_STREAM, "stuck", ack_wait=0.3, max_deliver=2)

        async def captured() -> Any:
            await stuck.fetch(1, timeout=0.2)  # taken, never acked
            rows = await asyncio.to_thread(_rows, running, kind="max_deliver")
            return rows[0] if rows else None

        row = await wait_until(captured, timeout=30, interval=0.05, what="the max-deliver dead letter")
        assert dl.decode_payload(row["payload"], row["payload_encoding"]) == payload
        assert (row["source_subject"], row["delivered"], row["headers"]["X-Trace"]) == (subject, 2, "t-1")
        assert "MaxDeliver" in row["error_message"]
        outcome = await Actions(running.stack.store, transport).reprocess(row, by="tester", why="consumer fixed")
        assert (outcome.outcome, outcome.detail) == ("republished", f"to {subject}")  # back to its own topic
        got = await wait_until(lambda: stuck.fetch(1, timeout=0.5), timeout=15, what="the republished message")
        assert got[0].data == payload and got[0].headers["Weft-Reprocessed-From"] == row["id"]
        await got[0].ack()
        await stuck.close()
