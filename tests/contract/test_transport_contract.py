"""Contract of the broker port (services.broker.ports.Transport), run against NATS JetStream and Kafka.

`TransportContract` holds the tests; each adapter subclass says how to get a connected
transport with its streams ensured (`t`), and what runs beside a consumer to dead-letter what
exceeds max_deliver (`max_deliver_capture`: on NATS the deadletters service's advisory capture,
on Kafka nothing, its consumers do it themselves). Ack waits are short to keep the suite quick.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from contracts import deadletters as dl
from contracts.subjects import DLQ_STREAM, STEPS_STREAM
from services.broker import Consumer, Delivery, OutMessage, Transport

pytestmark = pytest.mark.integration
ACK_WAIT = 1.0


async def drain(consumer: Consumer, n: int, timeout: float = 10.0) -> list[Delivery]:
    """Fetch until n deliveries came (fails after timeout)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"only {len(got)} of {n} deliveries within {timeout:g}s")
        got += await consumer.fetch(n - len(got), timeout=min(left, 1.0))
    return got


async def quiet(consumer: Consumer, for_: float) -> list[Delivery]:
    """What arrives within `for_` seconds (should be nothing)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + for_
    while time.monotonic() < deadline:
        got += await consumer.fetch(10, timeout=max(0.01, deadline - time.monotonic()))
    return got


def step(i: int, key: str = "exec-1") -> OutMessage:
    return OutMessage(subject="weft.steps.python", data=b"m%d" % i, msg_id=f"{key}:s{i}:1", headers={"h": str(i)},
                      key=key)


class TransportContract:
    @pytest.fixture
    async def t(self) -> AsyncIterator[Transport]:
        raise NotImplementedError("adapter test classes provide t")
        yield  # pragma: no cover

    @contextlib.asynccontextmanager
    async def max_deliver_capture(self, t: Transport) -> AsyncIterator[None]:
        yield

    async def consumer(self, t: Transport, durable: str = "c", **kw: object) -> Consumer:
        kw.setdefault("ack_wait", ACK_WAIT)
        return await t.consumer(STEPS_STREAM, durable, **kw)  # type: ignore[arg-type]

    # -- publish / consume ---------------------------------------------------
    async def test_publish_and_consume(self, t: Transport) -> None:
        assert isinstance(t, Transport)
        assert await t.publish(step(1)) is True
        await t.publish_many([step(2), step(3, key="exec-2")])
        c = await self.consumer(t)
        got = sorted(await drain(c, 3), key=lambda m: m.data)
        assert [m.data for m in got] == [b"m1", b"m2", b"m3"]
        assert [m.subject for m in got] == ["weft.steps.python"] * 3
        assert [m.msg_id for m in got] == ["exec-1:s1:1", "exec-1:s2:1", "exec-2:s3:1"]
        assert [m.headers.get("h") for m in got] == ["1", "2", "3"]
        assert all(m.delivered == 1 for m in got)
        assert len({m.stream_seq for m in got}) == 3 and all(m.stream_seq >= 1 for m in got)
        for m in got:
            await m.ack()
        await c.close()

    async def test_a_msg_id_published_again_is_delivered_once(self, t: Transport) -> None:
        assert await t.publish(step(1)) is True
        assert await t.publish(step(1)) is False  # recognised at once: the same publisher, just now
        await t.publish(step(2))
        c = await self.consumer(t)
        got = await drain(c, 2)
        got += await quiet(c, 0.5)
        assert sorted(m.data for m in got) == [b"m1", b"m2"]
        for m in got:
            await m.ack()
        await c.close()

    async def test_filter_subject(self, t: Transport) -> None:
        await t.publish_many([step(1), OutMessage("weft.steps.http", b"other", msg_id="o")])
        c = await self.consumer(t, filter_subject="weft.steps.http")
        [m] = await drain(c, 1)
        assert m.data == b"other"
        await m.ack()
        assert await quiet(c, 0.5) == []
        await c.close()

    # -- ack / nak / in-progress / ack wait --------------------------------------
    async def test_ack_is_final_and_nak_redelivers(self, t: Transport) -> None:
        await t.publish_many([step(1), step(2)])
        c = await self.consumer(t)
        a, b = sorted(await drain(c, 2), key=lambda m: m.data)
        await a.ack()
        await b.nak()
        [again] = await drain(c, 1)
        assert again.data == b"m2" and again.delivered == 2
        await again.ack()
        assert await quiet(c, ACK_WAIT * 1.5) == []
        await c.close()

    async def test_nak_with_delay(self, t: Transport) -> None:
        await t.publish(step(1))
        c = await self.consumer(t)
        [m] = await drain(c, 1)
        await m.nak(delay=1.0)
        start = time.monotonic()
        [again] = await drain(c, 1, timeout=5)
        assert time.monotonic() - start >= 0.8
        assert again.delivered == 2
        await again.ack()
        await c.close()

    async def test_ack_wait_redelivers_and_in_progress_holds_it(self, t: Transport) -> None:
        await t.publish_many([step(1), step(2)])
        c = await self.consumer(t)
        held, dropped = sorted(await drain(c, 2), key=lambda m: m.data)
        start = time.monotonic()
        redelivered: list[Delivery] = []
        while time.monotonic() - start < ACK_WAIT * 1.7:  # the worker of `held` is alive, of `dropped` dead
            await held.in_progress()
            redelivered += await c.fetch(10, timeout=ACK_WAIT / 4)
        assert [m.data for m in redelivered] == [b"m2"]
        assert redelivered[0].delivered == 2
        await held.ack()
        await redelivered[0].ack()
        await c.close()

    async def test_max_deliver_goes_to_the_dead_letters(self, t: Transport) -> None:
        await t.publish(step(7))
        async with self.max_deliver_capture(t):
            c = await self.consumer(t, max_deliver=2)
            for n in (1, 2):
                [m] = await drain(c, 1)
                assert m.delivered == n
                seq = m.stream_seq
                await m.nak()
            dlq = await t.consumer(DLQ_STREAM, "dlq", ack_wait=5.0, max_deliver=-1)
            letters: list[Delivery] = []
            deadline = time.monotonic() + 15
            while not letters and time.monotonic() < deadline:
                # A pull waiting on the source is what makes JetStream notice (and announce) the give-up.
                assert await c.fetch(1, timeout=0.1) == []
                letters = await dlq.fetch(1, timeout=0.2)
            [letter] = letters
            assert letter.subject == "weft.dlq.max_deliver" and letter.data == b"m7"
            assert letter.headers[dl.KIND_HEADER] == "max_deliver"
            assert letter.headers[dl.SOURCE_SUBJECT_HEADER] == "weft.steps.python"
            assert letter.headers[dl.MSG_ID_HEADER] == dl.message_key(STEPS_STREAM, seq)
            await letter.ack()
            assert await quiet(c, ACK_WAIT * 1.5) == []
            await c.close()
            await dlq.close()

    # -- dead letters: written, read, deleted ---------------------------------------
    async def test_dead_letters_are_read_and_deleted_by_ack(self, t: Transport) -> None:
        await t.dead_letter("poison", b"\x00bad", reason="cannot decode", headers={"x": "1"},
                            source_subject="weft.results.e1", delivered=3, msg_id="dlq:WEFT_RESULTS:9")
        dlq = await t.consumer(DLQ_STREAM, "dlq", ack_wait=ACK_WAIT, max_deliver=-1)
        [m] = await drain(dlq, 1)
        assert m.subject == "weft.dlq.poison" and m.data == b"\x00bad"
        h = m.headers
        assert (h[dl.KIND_HEADER], h[dl.REASON_HEADER], h[dl.SOURCE_SUBJECT_HEADER], h[dl.DELIVERED_HEADER],
                h[dl.MSG_ID_HEADER], h["x"]) == ("poison", "cannot decode", "weft.results.e1", "3",
                                                 "dlq:WEFT_RESULTS:9", "1")
        await m.ack()
        await dlq.close()
        again = await t.consumer(DLQ_STREAM, "dlq", ack_wait=ACK_WAIT, max_deliver=-1)
        assert await quiet(again, ACK_WAIT * 1.5) == []
        await again.close()

    # -- no head-of-line blocking; restarts ---------------------------------------------
    async def test_parallel_within_one_key_and_restart_resumes_after_the_acked_prefix(self, t: Transport) -> None:
        # One key: one partition on Kafka. All five are out at once, none waits for another's ack.
        await t.publish_many([step(i) for i in range(1, 6)])
        c = await self.consumer(t, durable="par")
        got = sorted(await drain(c, 5), key=lambda m: m.data)
        assert [m.data for m in got] == [b"m1", b"m2", b"m3", b"m4", b"m5"]
        for m in reversed(got[:3]):  # out of order, and m4 never: its worker dies
            await m.ack()
        await got[4].ack()
        await c.close()
        c = await self.consumer(t, durable="par")
        again = await drain(c, 1, timeout=15)
        again += await quiet(c, ACK_WAIT * 1.5)
        seen = {m.data for m in again}
        # m4 comes back; m5 may too (it follows the unacked one); the acked prefix never does.
        assert b"m4" in seen and seen <= {b"m4", b"m5"}
        for m in again:
            await m.ack()
        await c.close()


class TestNatsTransport(TransportContract):
    @pytest.fixture
    async def t(self, transport: Transport) -> AsyncIterator[Transport]:
        yield transport

    @contextlib.asynccontextmanager
    async def max_deliver_capture(self, t: Transport) -> AsyncIterator[None]:
        from services.deadletters.ingest import MaxDeliverCapture
        from services.deadletters.nats_archive import NatsArchive

        stop = asyncio.Event()
        archive = NatsArchive(t)  # type: ignore[arg-type]
        await archive.ensure()  # the advisories are kept from now on
        capture = MaxDeliverCapture(t, archive, ack_wait=ACK_WAIT)
        task = asyncio.ensure_future(capture.run(stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


class TestKafkaTransport(TransportContract):
    @pytest.fixture
    async def t(self, kafka_transport: Transport) -> AsyncIterator[Transport]:
        yield kafka_transport

    async def test_a_copy_from_another_publisher_is_passed_over_by_the_consumer(
        self, t: Transport, kafka_url: str,
    ) -> None:
        # A relay that crashed before saving its position publishes again from a new process:
        # Kafka stores both, the consumer that holds (or just acked) the first drops the copy.
        from services.broker.kafka import KafkaTransport

        await t.publish(step(1))
        c = await self.consumer(t)
        [first] = await drain(c, 1)
        again = await KafkaTransport.connect(kafka_url, namespace=t.namespace)  # type: ignore[attr-defined]
        try:
            assert await again.publish(step(1)) is True  # a new process does not know it
            await again.publish(step(2))
        finally:
            await again.close()
        [second] = await drain(c, 1)
        assert second.data == b"m2"
        await first.ack()
        await second.ack()
        assert await quiet(c, 0.5) == []
        assert c.duplicates == 1  # type: ignore[attr-defined]
        await c.close()
