"""The shelf: garbage off a work queue waits a moment and goes to the DLQ many at a time,
acked at its source only once stored (real NATS)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from contracts.subjects import DLQ_STREAM, STEPS_STREAM, step_subject
from services.broker import NatsTransport, OutMessage
from services.broker.ports import DeadLetter, Delivery
from services.broker.shelving import Shelf
from tests.fixtures_nats import wait_until

pytestmark = pytest.mark.integration
log = logging.getLogger("test.shelving")


class Recording:
    """The real transport, with each dead_letter_many call's size written down (or refused)."""

    def __init__(self, transport: NatsTransport, refuse: bool = False):
        self.transport, self.refuse = transport, refuse
        self.writes: list[int] = []

    async def dead_letter_many(self, letters: Sequence[DeadLetter]) -> None:
        if self.refuse:
            raise ConnectionError("the DLQ is out of reach")
        self.writes.append(len(letters))
        await self.transport.dead_letter_many(letters)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def _garbage(transport: NatsTransport, n: int, *, ack_wait: float = 30) -> list[tuple[Delivery, str]]:
    await transport.publish_many([OutMessage(step_subject("noop"), b"garbage %d" % i, msg_id=f"g{i}") for i in range(n)])
    consumer = await transport.consumer(STEPS_STREAM, "shelf-test", ack_wait=ack_wait, max_deliver=-1)
    got: list[Delivery] = []
    while len(got) < n:
        got += await consumer.fetch(n - len(got), timeout=2)
    return [(m, f"bad {m.stream_seq}") for m in got]


async def _left(transport: NatsTransport, stream: str, durable: str, timeout: float = 0.3) -> list[Delivery]:
    consumer = await transport.consumer(stream, durable, max_deliver=-1)
    out: list[Delivery] = []
    while batch := await consumer.fetch(100, timeout=timeout):
        out += batch
    return out


def _shelf(t: Any, **kw: Any) -> Shelf:
    return Shelf(t, "poison", STEPS_STREAM, crash="test.shelf", what="test message(s)", log=log, **kw)


async def test_what_arrives_within_the_linger_goes_in_one_write_then_is_acked(transport: NatsTransport) -> None:
    msgs = await _garbage(transport, 10)
    spy = Recording(transport)
    shelf = _shelf(spy, linger=2, most=100)
    shelf.put(msgs[:4])
    await asyncio.sleep(0.1)
    shelf.put(msgs[4:])
    assert spy.writes == []  # still lingering
    await wait_until(lambda: spy.writes, timeout=10, message="the shelf's write")
    assert spy.writes == [10]
    stored = await _left(transport, DLQ_STREAM, "dlq-reader")
    assert sorted(m.data for m in stored) == sorted(m.data for m, _ in msgs)
    assert {m.headers["Weft-Dlq-Reason"] for m in stored} == {r for _, r in msgs}
    assert await _left(transport, STEPS_STREAM, "shelf-test") == []  # acked off the work queue


async def test_a_full_shelf_goes_at_once_in_chunks_of_most(transport: NatsTransport) -> None:
    msgs = await _garbage(transport, 12)
    spy = Recording(transport)
    shelf = _shelf(spy, linger=30, most=5)
    shelf.put(msgs)
    await wait_until(lambda: sum(spy.writes) == 12, timeout=10, message="all 12 written")  # the linger is 30 s
    assert spy.writes == [5, 5, 2]
    assert len(await _left(transport, DLQ_STREAM, "dlq-reader")) == 12


async def test_close_shelves_what_waits_without_lingering(transport: NatsTransport) -> None:
    msgs = await _garbage(transport, 3)
    spy = Recording(transport)
    shelf = _shelf(spy, linger=30)
    shelf.put(msgs)
    await asyncio.wait_for(shelf.close(), 5)
    assert spy.writes == [3]
    assert await _left(transport, STEPS_STREAM, "shelf-test") == []


async def test_a_failed_write_acks_nothing_and_the_messages_come_back(transport: NatsTransport) -> None:
    msgs = await _garbage(transport, 4, ack_wait=1)
    shelf = _shelf(Recording(transport, refuse=True), linger=0.05)
    shelf.put(msgs)
    await asyncio.sleep(0.3)
    assert await _left(transport, DLQ_STREAM, "dlq-reader") == []
    await asyncio.sleep(1.2)  # ack_wait: unacked, so redelivered
    again = await _left(transport, STEPS_STREAM, "shelf-test", timeout=1)
    assert sorted(m.stream_seq for m in again) == sorted(m.stream_seq for m, _ in msgs)
    assert all(m.delivered == 2 for m in again)
