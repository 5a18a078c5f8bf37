"""The NATS transport never sends what the server would close it for, and comes back when the
server closes it anyway (a raw oversized publish, a restart): against a real nats-server."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from contracts.subjects import STEPS_STREAM, dlq_subject, step_subject
from services.broker import DeadLetter, OutMessage, PayloadTooLarge
from services.broker.batching import Batcher
from services.broker import nats_auth
from services.broker.nats import NatsTransport
from tests.fixtures_nats import start_nats_server, wait_until
from tests.integration.test_nats_auth import _AuthServer, auth_server  # noqa: F401 - a fixture
from tests.support import stack_up

pytestmark = pytest.mark.integration


async def _server_closes(transport: NatsTransport) -> None:
    """Make the server close the transport's connection the way issue 13 saw it: a message whose
    body nats-py lets through but whose headers take it over max_payload ('Maximum Payload Violation')."""
    nc = transport._nc
    limit, reconnects = nc.max_payload, nc.stats["reconnects"]
    # On a subject every role may publish to (a worker's results), so that only the size is wrong.
    await nc.publish(transport.subject("weft.results.oversize"), b"x" * (limit - 10), headers={"Pad": "p" * 200})
    # nats-py closes the client for good when it reads the -ERR; when the server's close of the
    # socket wins the race, it sees a dropped connection instead and reconnects by itself.
    await wait_until(lambda: nc.is_closed or nc.stats["reconnects"] > reconnects, timeout=10,
                     message="the server to close the connection")


async def test_a_message_over_max_payload_is_refused_before_the_wire(transport: NatsTransport) -> None:
    limit = transport._nc.max_payload
    body = b"x" * (limit - 10)  # under the limit alone; nats-py would send it
    big = OutMessage(subject=step_subject("noop"), data=body, msg_id="big:1")  # Nats-Msg-Id takes it over
    with pytest.raises(PayloadTooLarge) as caught:
        await transport.publish(big)
    assert caught.value.limit == limit and caught.value.size > limit and not caught.value.retryable
    assert str(limit) in str(caught.value)
    small = [OutMessage(subject=step_subject("noop"), data=b"{}", msg_id=f"s:{i}") for i in range(40)]
    for batch in ([big], small[:3] + [big], small[:20] + [big] + small[20:]):  # single, pipelined, atomic
        with pytest.raises(PayloadTooLarge):
            await transport.publish_many(batch)
    # A big payload is cut to a preview (services.broker.oversize); the source message's own
    # headers are kept as they are, and can still take a dead letter over the limit.
    fat = {"Source-Header": "h" * limit}
    with pytest.raises(PayloadTooLarge):
        await transport.dead_letter("poison", b"{}", reason="r", headers=fat, msg_id="dl:1")
    with pytest.raises(PayloadTooLarge):
        await transport.dead_letter_many([DeadLetter("poison", b"{}", "r", headers=fat, msg_id="dl:2")])
    # Nothing reached the wire: the connection is the same one, and works.
    assert transport.is_connected and transport._generation == 0
    await transport.publish_many(small)
    consumer = await transport.consumer(STEPS_STREAM, "w", filter_subject=step_subject("noop"))
    got: list[object] = []

    async def all_there() -> bool:
        got.extend(await consumer.fetch(100, timeout=0.5))
        return len(got) >= 40

    await wait_until(all_there, timeout=10)
    assert len(got) == 40
    # A batch that just fits alone but not with the atomic batch headers goes one by one.
    exact = limit - len(b"NATS/1.0\r\n\r\n") - len(b"Nats-Msg-Id: edge:1\r\n")
    edge = OutMessage(subject=dlq_subject("poison"), data=b"y" * exact, msg_id="edge:1")
    await transport.publish_many([OutMessage(subject=dlq_subject("poison"), data=b"{}", msg_id=f"e:{i}")
                                  for i in range(20)] + [edge])
    assert transport._generation == 0


async def test_the_transport_comes_back_after_the_server_closed_it(transport: NatsTransport) -> None:
    consumer = await transport.consumer(STEPS_STREAM, "w", filter_subject=step_subject("noop"), ack_wait=5)
    await transport.publish(OutMessage(subject=step_subject("noop"), data=b"1", msg_id="m1"))
    assert len(await consumer.fetch(1, timeout=2)) == 1
    await _server_closes(transport)
    await wait_until(lambda: transport.is_connected, timeout=15, message="a new client")
    # Publishing and the existing consumer work again (it binds through the new client).
    await transport.publish(OutMessage(subject=step_subject("noop"), data=b"2", msg_id="m2"))
    await transport.publish_many([OutMessage(subject=step_subject("noop"), data=b"3", msg_id=f"m3:{i}")
                                  for i in range(20)])
    seen: list[bytes] = []

    async def fetched() -> bool:
        for d in await consumer.fetch(50, timeout=0.5):
            seen.append(d.data)
            await d.ack()
        return {b"2", b"3"} <= set(seen)

    await wait_until(fetched, timeout=20, message="messages through the new client")


async def test_a_closed_transport_stays_closed(transport: NatsTransport) -> None:
    await transport.close()
    await asyncio.sleep(0.2)
    assert not transport.is_connected and transport._reopening is None


async def test_readyz_recovers_after_the_server_closes_the_connection(tmp_path: Path, pg_url: str) -> None:
    server = start_nats_server(tmp_path / "nats")
    try:
        async with stack_up(tmp_path, pg_url, server.url) as running:
            version = running.publish("name: after-close\nsteps:\n  - {id: a, type: noop}\n")
            async with httpx.AsyncClient(base_url=running.stack.gateway.url, timeout=5) as client:
                assert (await client.get("/readyz")).status_code == 200
                await _server_closes(running.stack.transport)

                async def ready() -> bool:
                    return (await client.get("/readyz")).status_code == 200

                await wait_until(ready, timeout=20, message="/readyz to answer 200 again")
            eid = await running.start(version, {})
            assert (await running.finished(eid, timeout=30)).status == "completed"
            # And after a server restart on the same port (nats-py's own reconnect).
            server.restart()
            eid = await running.start(version, {})
            assert (await running.finished(eid, timeout=60)).status == "completed"
    finally:
        server.stop()


async def test_one_message_too_large_fails_alone_in_a_group_commit(transport: NatsTransport) -> None:
    limit = transport._nc.max_payload
    batcher = Batcher(transport.publish_many)
    sizes = [10] * 30
    sizes[17] = limit + 1
    outcomes = await asyncio.gather(
        *(batcher.publish(OutMessage(subject=step_subject("noop"), data=b"x" * n, msg_id=f"g:{i}"))
          for i, n in enumerate(sizes)),
        return_exceptions=True,
    )
    assert [type(o).__name__ for o in outcomes] == ["NoneType"] * 17 + ["PayloadTooLarge"] + ["NoneType"] * 12
    consumer = await transport.consumer(STEPS_STREAM, "w", filter_subject=step_subject("noop"))
    got: list[object] = []

    async def all_there() -> bool:
        got.extend(await consumer.fetch(100, timeout=0.5))
        return len(got) >= 29

    await wait_until(all_there, timeout=10)
    assert transport._generation == 0


async def test_a_client_closed_without_its_callback_is_replaced_all_the_same(transport: NatsTransport) -> None:
    # nats-py closes without calling closed_cb when the server's -ERR comes while it is
    # (re)connecting (Client._process_err: do_cbs=False); seen in this suite's readyz test.
    from nats.aio.client import Client as NATS

    consumer = await transport.consumer(STEPS_STREAM, "w", filter_subject=step_subject("noop"))
    await transport._nc._close(NATS.CLOSED, do_cbs=False)
    assert transport._nc.is_closed and transport._reopening is None
    assert await consumer.fetch(1, timeout=0.2) == []  # waits for the connection, and starts a new one
    await wait_until(lambda: transport.is_connected, timeout=15, message="a new client")
    await transport.publish(OutMessage(subject=step_subject("noop"), data=b"1", msg_id="after"))
    got = await wait_until(lambda: consumer.fetch(1, timeout=0.5), timeout=10)
    assert [d.data for d in got] == [b"1"]  # type: ignore[union-attr]


async def test_a_worker_with_credentials_comes_back_with_them(auth_server: _AuthServer) -> None:  # noqa: F811 - the fixture
    """The new client is made with the closed one's options: its user, password and inbox prefix."""
    admin = await auth_server.connect(nats_auth.ADMIN)
    worker = await auth_server.connect(nats_auth.WORKER)
    try:
        await admin.ensure_streams()
        consumer = await worker.consumer(STEPS_STREAM, nats_auth.WORKER_DURABLE)
        await _server_closes(worker)
        await wait_until(lambda: worker.is_connected, timeout=15, message="a new client")
        await admin.publish(OutMessage(subject=step_subject("noop"), data=b"1", msg_id=f"cred-{uuid.uuid4().hex}"))
        got = await wait_until(lambda: consumer.fetch(1, timeout=0.5), timeout=10)
        for d in got:  # type: ignore[union-attr]
            await d.ack()  # the ack goes out on the new client, under the worker's own permissions
        assert worker._nc.connect_args[1]["user"] == nats_auth.WORKER  # type: ignore[attr-defined]
    finally:
        await worker.close()
        await admin.close()
