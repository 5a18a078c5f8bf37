"""Triggers written straight to the Kafka triggers topic by any Kafka client, in the CloudEvents Kafka
binding (binary mode: `ce_*` headers; structured mode: `content-type: application/cloudevents+json`),
with the official CloudEvents SDK as the producer's encoder: exactly one start per (source, id),
invalid and unroutable records in the dead-letter store, and a dead letter republished to the topic
it came from."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from cloudevents.core.bindings import kafka as sdk_kafka
from cloudevents.core.v1.event import CloudEvent as SdkEvent

from contracts.subjects import TRIGGERS_STREAM
from services.broker.kafka import parse_url
from services.deadletters import Actions
from tests.integration.test_dlq_messages import _rows
from tests.integration.test_triggers import DeadLetters, accepted, started, wf
from tests.support import Running, stack_up, wait_until

pytestmark = pytest.mark.integration
PARTS = ("orchestrator", "relay", "worker", "triggers", "deadletters", "projector")


@pytest.fixture
async def stack(tmp_path: Path, sqlite_url: str, kafka_url: str):
    async with stack_up(tmp_path, sqlite_url, kafka_url, parts=PARTS) as running:
        yield running


@pytest.fixture
async def producer(kafka_url: str):
    p = AIOKafkaProducer(bootstrap_servers=parse_url(kafka_url), acks="all")
    await p.start()
    yield p
    await p.stop()


def sdk_event(id_: str, type_: str = "order.created", data: Any = None, **attrs: object) -> SdkEvent:
    return SdkEvent({"type": type_, "source": "https://shop.example", "id": id_, **attrs},
                    data if data is not None else {"order_id": id_})


def _bytes(value: Any) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


async def send(stack: Running, producer: AIOKafkaProducer, record: Any, drop: str = "") -> None:
    """The SDK's Kafka record (its key and header values may be str; the wire wants bytes)."""
    topic = stack.stack.transport.stream_name(TRIGGERS_STREAM)  # type: ignore[attr-defined]
    headers = [(k, _bytes(v)) for k, v in record.headers.items() if k != drop]
    await producer.send_and_wait(topic, _bytes(record.value), key=_bytes(record.key), headers=headers)


async def test_binary_and_structured_records_start_once_each(stack: Running, producer: AIOKafkaProducer) -> None:
    store = stack.stack.store
    stack.publish(wf("kafka-orders", "order.created", "input_schema: {type: object, required: [order_id]}"))
    binary = sdk_kafka.to_binary_event(sdk_event("b-1", datacontenttype="application/json", partitionkey="cust-1"))
    structured = sdk_kafka.to_structured_event(sdk_event("s-1"))
    for record in (binary, binary, structured, structured):  # each twice: one start each
        await send(stack, producer, record)
    await wait_until(lambda: len(started(store, "kafka-orders")) >= 2, timeout=30, what="two executions")
    await wait_until(lambda: accepted(store, "https://shop.example", "b-1")
                     and accepted(store, "https://shop.example", "s-1"), timeout=10)
    runs = started(store, "kafka-orders")
    assert sorted(e["input"]["order_id"] for _, e in runs) == ["b-1", "s-1"]
    for execution_id, _ in runs:
        assert (await stack.finished(execution_id)).status == "completed"
    assert len(started(store, "kafka-orders")) == 2  # the repeats started nothing


async def test_invalid_and_unroutable_records_are_dead_lettered_and_republished_to_their_topic(
    stack: Running, producer: AIOKafkaProducer,
) -> None:
    transport = stack.stack.transport
    stack.publish(wf("kafka-orders", "order.created"))
    dlq = DeadLetters(transport)
    no_id = sdk_kafka.to_binary_event(sdk_event("x-1", datacontenttype="application/json"))
    await send(stack, producer, no_id, drop="ce_id")
    await send(stack, producer, sdk_kafka.to_binary_event(sdk_event(f"u-{uuid.uuid4().hex[:6]}", "nobody.listens")))
    letters = await dlq.wait_for(2)
    by_kind = {m.headers["Weft-Dlq-Kind"]: m for m in letters}
    assert "headers.ce_id" in by_kind["trigger_invalid"].headers["Weft-Dlq-Reason"]
    assert "binary mode" in by_kind["trigger_invalid"].headers["Weft-Dlq-Reason"]
    assert by_kind["trigger_unroutable"].headers["Weft-Dlq-Reason"] == (
        "no workflow subscribes to event type 'nobody.listens'")
    # The foreign record's "where it came from" is the triggers topic: republishing goes back there.
    unroutable = by_kind["trigger_unroutable"]
    assert unroutable.headers["Weft-Dlq-Source-Subject"] == "weft.triggers"
    stack.publish(wf("late-listener", "nobody.listens"))
    [row] = await wait_until(lambda: _rows(stack, kind="trigger_unroutable"), timeout=20, what="the dead letter row")
    outcome = await Actions(stack.stack.store, transport).reprocess(row, by="tester", why="a workflow listens now")
    assert (outcome.outcome, outcome.detail) == ("republished", "to weft.triggers")
    await wait_until(lambda: started(stack.stack.store, "late-listener"), timeout=30, what="the republished trigger")
