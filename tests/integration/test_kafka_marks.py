"""The Kafka consumer's delivery counts survive the process that handed the record out.

Real Tansu. A consumer fetches a record and goes away without settling it; the group member that
takes the partition over gets it with its count grown (services/broker/kafka_marks.py), as a
JetStream consumer would: that is what lets the crash guard contain a record that kills every
process it reaches (tests/integration/test_poison.py proves that end to end, with SIGKILLs).
"""

from __future__ import annotations

import uuid

import pytest

from contracts.subjects import STEPS_STREAM
from services.broker import OutMessage

pytestmark = pytest.mark.integration


async def test_a_count_survives_the_consumer(kafka_transport: object) -> None:
    from services.broker.kafka import KafkaTransport

    t = kafka_transport
    assert isinstance(t, KafkaTransport)
    subject = "weft.steps.noop"
    await t.publish(OutMessage(subject, b"kills", msg_id=str(uuid.uuid4()), key="one"))
    durable = f"marks-{uuid.uuid4().hex[:6]}"
    for expected in (1, 2, 3):
        consumer = await t.consumer(STEPS_STREAM, durable, ack_wait=30)
        got = await consumer.fetch(1, timeout=20)
        assert [m.delivered for m in got] == [expected]
        await consumer.close()  # unsettled: as if the process had died
    consumer = await t.consumer(STEPS_STREAM, durable, ack_wait=30)
    got = await consumer.fetch(1, timeout=20)
    assert got[0].delivered == 4
    await got[0].ack()
    await consumer.close()
