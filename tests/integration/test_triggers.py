"""Trigger events on topics, over a real NATS and a real database: exactly once per
(source, id) forever, fan-out to every subscriber, filters, and the dead-letter stream."""

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

from contracts.subjects import DLQ_STREAM, trigger_subject
from contracts.triggers import TriggerAccepted, trigger_stream
from services.broker import OutMessage
from services.store import open_store
from services.triggers.ingest import trigger_execution_id
from services.triggers.publish import encode, new_event, publish, to_message
from tests.support import Running, stack_up
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
PARTS = ("orchestrator", "relay", "worker", "triggers")


@pytest.fixture
async def stack(tmp_path: Path, db_url: str, broker_url: str):
    async with stack_up(tmp_path, db_url, broker_url, parts=PARTS) as running:
        yield running


def wf(name: str, event: str, extra: str = "") -> str:
    return f"""
name: {name}
on:
  - event: {event}
{extra}
steps:
  - {{id: echo, type: transform, with: {{expression: "@"}}, input: "${{{{ input }}}}"}}
output: "${{{{ steps.echo.output }}}}"
"""


def started(store: Any, workflow: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(execution id, ExecutionStarted) of every execution, optionally of one workflow."""
    out = []
    for rec in store.read(0, 100_000, types=["ExecutionStarted"]):
        e = orjson.loads(rec.data)
        if workflow is None or e["workflow"] == workflow:
            out.append((str(rec.stream_id), e))
    return out


def accepted(store: Any, source: str, event_id: str) -> list[TriggerAccepted]:
    return [TriggerAccepted.model_validate_json(r.data) for r in store.load(trigger_stream(source, event_id))]


class DeadLetters:
    def __init__(self, transport: Any):
        self.transport, self.letters = transport, []
        self.consumer: Any = None

    async def wait_for(self, n: int, timeout: float = 20) -> list[Any]:
        if self.consumer is None:
            self.consumer = await self.transport.consumer(DLQ_STREAM, f"check{uuid.uuid4().hex[:6]}")

        async def enough() -> bool:
            self.letters.extend(await self.consumer.fetch(50, timeout=0.3))
            return len(self.letters) >= n

        await wait_until(enough, timeout=timeout, what=f"{n} dead letters")
        return self.letters


async def test_the_same_event_published_three_times_starts_one_execution(stack: Running) -> None:
    store, transport = stack.stack.store, stack.stack.transport
    stack.publish(wf("once", "order.created"))
    event = new_event("order.created", {"order": 1}, id="evt-1", source="shop")
    assert await publish(transport, event) is True
    assert await publish(transport, event) is False  # inside the broker's window: dropped there
    assert await publish(transport, event) is False
    # Beyond the broker's window (simulated with fresh message ids), the trigger log catches it.
    for n in range(2):
        await transport.publish(OutMessage(trigger_subject(event.type), encode(event), msg_id=f"later-{n}"))
    consumer = stack.stack.triggers
    await wait_until(lambda: consumer.handled >= 3, timeout=20, what="3 deliveries")
    runs = started(store, "once")
    assert len(runs) == 1
    eid, first = runs[0]
    assert eid == trigger_execution_id("once", "shop", "evt-1")
    assert first["trigger"]["id"] == "evt-1" and first["trigger"]["source"] == "shop" and first["input"] == {"order": 1}
    assert consumer.ingestor.duplicates >= 2
    [log] = accepted(store, "shop", "evt-1")
    assert log.event["data"] == {"order": 1} and log.event["type"] == "order.created"  # the full event, for backfill
    assert log.executions == {"once@1": eid} and log.via == "topic"
    assert (await stack.finished(eid)).output == {"order": 1}


async def test_two_workflows_subscribed_to_one_type_start_two_executions(stack: Running) -> None:
    store = stack.stack.store
    stack.publish(wf("billing", "order.paid"))
    stack.publish(wf("shipping", "order.paid"))
    stack.publish(wf("unrelated", "order.refunded"))
    await publish(stack.stack.transport, new_event("order.paid", {"n": 1}, id="p-1", source="shop"))
    await wait_until(lambda: len(started(store)) >= 2, timeout=20)
    await asyncio.sleep(0.3)
    assert sorted(e["workflow"] for _, e in started(store)) == ["billing", "shipping"]
    [log] = accepted(store, "shop", "p-1")
    assert sorted(log.executions) == ["billing@1", "shipping@1"]
    for eid, _ in started(store):
        assert (await stack.finished(eid)).status == "completed"


async def test_a_filter_that_does_not_match_starts_nothing_and_is_recorded(stack: Running) -> None:
    store = stack.stack.store
    stack.publish(wf("eu-only", "order.created", "    filter: {data.region: [eu, uk], subject: orders}"))
    transport = stack.stack.transport
    await publish(transport, new_event("order.created", {"region": "us"}, id="us-1", source="shop", subject="orders"))
    await publish(transport, new_event("order.created", {"region": "eu"}, id="eu-1", source="shop", subject="other"))
    await publish(transport, new_event("order.created", {"region": "uk"}, id="uk-1", source="shop", subject="orders"))
    # One subject, one consumer: by the time the last one started, the first two were handled.
    await wait_until(lambda: started(store, "eu-only"), timeout=20)
    assert [e["trigger"]["id"] for _, e in started(store, "eu-only")] == ["uk-1"]
    for event_id in ("us-1", "eu-1"):
        [log] = accepted(store, "shop", event_id)
        assert log.executions == {} and log.filtered == ["eu-only@1"]
    # filtered out is normal traffic, not an error: nothing was dead-lettered
    await wait_until(lambda: stack.stack.triggers.handled >= 3, timeout=10)
    consumer = await transport.consumer(DLQ_STREAM, f"check{uuid.uuid4().hex[:6]}")
    assert await consumer.fetch(10, timeout=1.0) == []
    assert stack.stack.triggers.unroutable == 0 and stack.stack.triggers.invalid == 0


async def test_invalid_and_unroutable_events_land_in_the_dead_letter_stream(stack: Running) -> None:
    store, transport = stack.stack.store, stack.stack.transport
    stack.publish(wf("strict", "order.created", "input_schema: {type: object, required: [order_id]}"))
    stack.publish(wf("lenient", "order.created"))
    dlq = DeadLetters(transport)
    subject = trigger_subject("order.created")
    await transport.publish(OutMessage(subject, b"\x00 not json", msg_id="bad-1"))
    await transport.publish(OutMessage(subject, orjson.dumps({"source": "shop", "type": "order.created"}), msg_id="bad-2"))
    wrong_topic = new_event("order.shipped", {}, id="w-1", source="shop")
    await transport.publish(OutMessage(subject, encode(wrong_topic), msg_id="bad-3"))
    await publish(transport, new_event("nobody.listens", {"x": 1}, id="u-1", source="shop"))
    await publish(transport, new_event("order.created", {"no_order_id": True}, id="half-1", source="shop"))
    letters = await dlq.wait_for(5)
    by_kind: dict[str, list[str]] = {}
    for m in letters:
        by_kind.setdefault(m.headers["Weft-Dlq-Kind"], []).append(m.headers["Weft-Dlq-Reason"])
    invalid = " | ".join(by_kind["trigger_invalid"])
    assert len(by_kind["trigger_invalid"]) == 4, by_kind
    assert "not JSON" in invalid
    assert "id: Field required" in invalid
    assert "belongs on 'weft.triggers.order.shipped'" in invalid
    assert "workflow strict@1: invalid input: input: 'order_id' is a required property" in invalid
    assert by_kind["trigger_unroutable"] == ["no workflow subscribes to event type 'nobody.listens'"]
    payloads = {m.data for m in letters}
    assert b"\x00 not json" in payloads  # the payload is kept as it came
    # the event that one workflow rejected still started the other, and is in the trigger log
    await wait_until(lambda: started(store, "lenient"), timeout=10)
    assert started(store, "strict") == []
    [log] = accepted(store, "shop", "half-1")
    assert list(log.executions) == ["lenient@1"] and list(log.rejected) == ["strict@1"]
    assert accepted(store, "shop", "u-1") == []  # unroutable: dead-lettered, not recorded


async def test_a_corrected_repeat_starts_the_workflow_that_rejected_it_once(stack: Running) -> None:
    store, transport = stack.stack.store, stack.stack.transport
    stack.publish(wf("strict", "order.created", "input_schema: {type: object, required: [order_id]}"))
    bad = new_event("order.created", {}, id="fix-1", source="shop")
    await publish(transport, bad)
    await wait_until(lambda: accepted(store, "shop", "fix-1"), timeout=10)
    assert started(store, "strict") == []
    fixed = new_event("order.created", {"order_id": "A"}, id="fix-1", source="shop")  # e.g. a patched dead letter
    for n in range(3):
        await transport.publish(OutMessage(trigger_subject("order.created"), encode(fixed), msg_id=f"fixed-{n}"))
    await wait_until(lambda: started(store, "strict"), timeout=10)
    await wait_until(lambda: stack.stack.triggers.handled >= 4, timeout=10)
    [(eid, e)] = started(store, "strict")
    assert e["input"] == {"order_id": "A"} and eid == trigger_execution_id("strict", "shop", "fix-1")


async def test_a_burst_with_repeats_is_ingested_in_batches_exactly_once(stack: Running) -> None:
    store, transport = stack.stack.store, stack.stack.transport
    stack.publish(wf("bulk", "bulk.item"))
    events = [new_event("bulk.item", {"n": n}, id=f"b-{n}", source="loader") for n in range(400)]
    await transport.publish_many([to_message(e) for e in events])
    # repeats with fresh message ids, interleaved with new events: batches with both
    more = [new_event("bulk.item", {"n": n}, id=f"b-{n}", source="loader") for n in range(0, 400, 4)]
    extra = [new_event("bulk.item", {"n": n}, id=f"b-{n}", source="loader") for n in range(400, 500)]
    mixed = [OutMessage(trigger_subject("bulk.item"), encode(e), msg_id=f"again-{e.id}") for e in more]
    mixed += [to_message(e) for e in extra]
    await transport.publish_many(mixed)
    await wait_until(lambda: stack.stack.triggers.handled >= 600, timeout=60, what="600 deliveries")
    runs = started(store, "bulk")
    assert len(runs) == 500
    assert sorted(e["input"]["n"] for _, e in runs) == list(range(500))
    assert stack.stack.triggers.ingestor.duplicates >= 100


async def test_a_crash_between_commit_and_ack_loses_nothing_and_starts_nothing_twice(
    tmp_path: Path, pg_url: str, nats_url: str, transport: Any
) -> None:
    """SIGKILL the trigger consumer right after its store commit, before the acks; restart it."""
    store = open_store(pg_url)
    try:
        from contracts.definitions import parse_definition
        from services.orchestrator.registry import Registry

        Registry(store).publish(parse_definition(wf("crashy", "crash.test")))
        env = {**os.environ, "WEFT_HOME": str(tmp_path), "WEFT_DATABASE_URL": pg_url, "WEFT_NATS_URL": nats_url,
               "WEFT_NAMESPACE": transport.namespace, "WEFT_ACK_WAIT": "2", "WEFT_TRIGGER_BATCH": "20"}
        events = [new_event("crash.test", {"n": n}, id=f"c-{n}", source="crash") for n in range(60)]
        await transport.publish_many([to_message(e) for e in events])
        crashing = subprocess.Popen([sys.executable, "-m", "weft", "triggers"], cwd=ROOT,
                                    env={**env, "WEFT_CRASH_AT": "triggers.after_append:2"},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        code = await asyncio.to_thread(crashing.wait, 60)
        assert code == -9  # killed at the crash point, after committing its second batch
        assert 0 < len(started(store, "crashy")) < 60
        steady = subprocess.Popen([sys.executable, "-m", "weft", "triggers"], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_until(lambda: len(started(store, "crashy")) >= 60, timeout=60)
            await asyncio.sleep(2.5)  # past ack_wait: any redelivery would have happened by now
        finally:
            steady.terminate()
            await asyncio.to_thread(steady.wait, 20)
        runs = started(store, "crashy")
        assert len(runs) == 60 and len({eid for eid, _ in runs}) == 60
        logs = store.read(0, 10_000, types=["TriggerAccepted"])
        assert len(logs) == 60
    finally:
        store.close()
