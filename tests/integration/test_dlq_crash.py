"""Nothing dropped, nothing doubled: SIGKILL between storing a dead letter and acking its
source, then restart, over real subprocesses (`python -m weft <service>`), NATS and PostgreSQL.

- the dead-letter service killed after its append committed and before the DLQ acks;
- the orchestrator / a worker / the trigger consumer killed after publishing a poison
  message to the DLQ and before acking it on the results / steps / triggers stream.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from contracts import deadletters as dl
from contracts.subjects import DLQ_STREAM, result_subject, step_subject, trigger_subject
from services.broker import OutMessage
from services.broker.nats import NatsTransport
from services.deadletters import Filters, list_dead_letters, refresh
from services.store import open_store
from tests.support import Services, service_env, sigkilled, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path, pg_url: str, nats_url: str) -> dict[str, str]:
    return service_env(tmp_path, pg_url, nats_url, prefix="d")


@pytest.fixture
def services(tmp_path: Path, env: dict[str, str]):
    svc = Services(env, tmp_path / "logs")
    yield svc
    svc.stop_all()


@pytest.fixture
async def transport(env: dict[str, str], nats_url: str):
    t = await NatsTransport.connect(nats_url, namespace=env["WEFT_NAMESPACE"])
    await t.ensure_streams()
    yield t
    await t.close()


def _recorded(store: Any) -> list[Any]:
    out, position = [], 0
    while batch := store.read(position, 1000, ["DeadLetterRecorded", "DeadLetterSeen"]):
        out += batch
        position = batch[-1].position
    return out


def _rows(store: Any) -> list[dict[str, Any]]:
    refresh(store)  # the service may not have made the view yet
    with store.reader() as tx:
        return list_dead_letters(tx, Filters(), limit=10_000)


async def _settled(transport: NatsTransport, durable: str, stream: str) -> bool:
    info = await transport._js.consumer_info(transport.stream_name(stream), durable)  # noqa: SLF001
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_sigkill_between_store_and_ack_neither_loses_nor_doubles(
    services: Services, transport: NatsTransport, pg_url: str,
) -> None:
    payloads = [f"letter {i}".encode() for i in range(39)] + [b"\xff\x00binary"]
    for i, data in enumerate(payloads):
        await transport.dead_letter(
            "poison", data, reason=f"test {i}", source_subject=result_subject("x"), delivered=1, msg_id=f"src-{i}",
        )
    victim = services.start("deadletters", WEFT_CRASH_AT="deadletters.after_store:1")
    await sigkilled(victim)
    store = open_store(pg_url)
    try:
        stored_before_ack = len(await asyncio.to_thread(_recorded, store))
        assert stored_before_ack >= 1  # the batch was committed, and not acked: it comes back

        services.start("deadletters")

        async def all_in_view() -> bool:
            rows = await asyncio.to_thread(_rows, store)
            return len(rows) >= len(payloads) and await _settled(transport, "deadletters", DLQ_STREAM)

        await wait_until(all_in_view, timeout=60, interval=0.2, what="every dead letter in the view, all acked")
        await asyncio.sleep(1.0)  # anything redelivered late would show up now
        recorded = await asyncio.to_thread(_recorded, store)
        rows = await asyncio.to_thread(_rows, store)
        assert [r.type for r in recorded] == ["DeadLetterRecorded"] * len(payloads)  # redeliveries were no-ops
        assert len(rows) == len(payloads)
        assert sorted(dl.decode_payload(r["payload"], r["payload_encoding"]) for r in rows) == sorted(payloads)
    finally:
        store.close()


@pytest.mark.parametrize("victim,point,subject,kind", [
    ("orchestrator", "orchestrator.after_dead_letter:1", result_subject("poisoned"), "poison"),
    ("worker", "worker.after_dead_letter:1", step_subject("noop"), "poison"),
    ("triggers", "triggers.after_dead_letter:1", trigger_subject("order.created"), "trigger_invalid"),
])
async def test_sigkill_at_the_source_after_dead_lettering(
    services: Services, transport: NatsTransport, pg_url: str, victim: str, point: str, subject: str, kind: str,
) -> None:
    services.start("deadletters")
    proc = services.start(victim, WEFT_CRASH_AT=point)
    garbage = b"\x01 definitely not a message " + victim.encode()
    await transport.publish(OutMessage(subject, garbage, msg_id=f"garbage-{victim}"))
    await sigkilled(proc)
    services.start(victim)  # the source message is redelivered to the restarted service
    store = open_store(pg_url)
    try:
        durable = {"orchestrator": "orchestrator", "worker": "workers", "triggers": "triggers"}[victim]
        stream = {"orchestrator": "WEFT_RESULTS", "worker": "WEFT_STEPS", "triggers": "WEFT_TRIGGERS"}[victim]

        async def settled() -> bool:
            rows = await asyncio.to_thread(_rows, store)
            return (len(rows) >= 1 and await _settled(transport, durable, stream)
                    and await _settled(transport, "deadletters", DLQ_STREAM))

        await wait_until(settled, timeout=60, interval=0.2, what="the source acked and its dead letter in the view")
        await asyncio.sleep(1.0)
        rows = await asyncio.to_thread(_rows, store)
        assert len(rows) == 1
        row = rows[0]
        assert (row["kind"], row["source_subject"]) == (kind, subject)
        assert dl.decode_payload(row["payload"], row["payload_encoding"]) == garbage
        assert [r.type for r in await asyncio.to_thread(_recorded, store)] == ["DeadLetterRecorded"]
    finally:
        store.close()
