"""A message that kills the process handling it cannot crash-loop a service.

Real service subprocesses over a real broker (NATS JetStream, and Kafka on Tansu: `broker_url`)
and a SQLite file they share, as in test_crash.py (which uses PostgreSQL). On Kafka the delivery
count that tells the poison message survives the crashes in the group's marks topic
(services/broker/kafka_marks.py). A keyed crash point (services/faults.py) makes one chosen execution's message SIGKILL
every process that handles it; the test restarts the process each time, as a
supervisor would. After a bounded number of deliveries the message is not handled
again: its execution ends failed with PoisonMessage, the message is dead-lettered,
and every other execution completes.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from contracts.deadletters import KIND_HEADER, REASON_HEADER, SOURCE_SUBJECT_HEADER
from contracts.definitions import parse_definition
from contracts.subjects import DLQ_STREAM, trigger_subject
from services.broker import OutMessage
from services.broker.nats import NatsTransport
from services.broker.ports import Transport
from services.orchestrator.executions import Executions
from services.orchestrator.registry import Registry
from services.store import open_store
from services.triggers.ingest import trigger_execution_id
from tests.support import Services, assert_applied_once, service_env, wait_until

pytestmark = pytest.mark.integration
LIMIT = 3  # WEFT_POISON_DELIVERIES for these tests (the default is 5)

WORKFLOW = """
name: poisoned
steps:
  - {id: a, type: noop}
  - {id: b, type: sleep, needs: [a], with: {seconds: 0.2}}
  - {id: c, type: transform, needs: [b], map: "${{ input.items }}", with: {expression: "@"}}
output: "${{ steps.c.output }}"
"""


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'weft.db'}"


@pytest.fixture
def services(tmp_path: Path, db_url: str, broker_url: str):
    env = service_env(tmp_path, db_url, broker_url, prefix="p")
    env["WEFT_POISON_DELIVERIES"] = str(LIMIT)
    svc = Services(env, tmp_path / "logs")
    yield svc
    svc.stop_all()


def _patience(services: Services) -> float:
    """Seconds for everything to finish: on Kafka each crash waits out the group's session timeout
    (6 s) and a rebalance before the poison record reaches the restarted process."""
    return 240.0 if services.env["WEFT_BROKER_URL"].startswith("kafka://") else 120.0


async def _connect(services: Services) -> Transport:
    url, namespace = services.env["WEFT_BROKER_URL"], services.env["WEFT_NAMESPACE"]
    if url.startswith("kafka://"):
        from services.broker.kafka import KafkaTransport

        return cast(Transport, await KafkaTransport.connect(url, namespace=namespace))
    return cast(Transport, await NatsTransport.connect(url, namespace=namespace))


async def _dead_letters(transport: Transport, reader: list[Any]) -> list[Any]:
    """Every dead letter so far, as (headers, data): by sequence on NATS; on Kafka by a consumer group
    of the test's own (`reader` keeps it, and what it read, between calls)."""
    if isinstance(transport, NatsTransport):
        letters = []
        for seq in range(1, 50):
            stored = await transport.get_message(DLQ_STREAM, seq)
            if stored is None:
                break
            letters.append((stored.headers, stored.data))
        return letters
    if not reader:
        reader.append(await transport.consumer(DLQ_STREAM, f"poison-test-{uuid.uuid4().hex[:8]}"))
    batch = await reader[0].fetch(50, timeout=1.0)
    for msg in batch:
        reader.append((dict(msg.headers), msg.data))
        await msg.ack()
    return reader[1:]


async def _supervise(services: Services, name: str, env: dict[str, str], until: asyncio.Event) -> int:
    """Restart `name` whenever it dies, like a supervisor; the number of restarts (each a SIGKILL)."""
    restarts = 0
    while not until.is_set():
        proc = services.procs[name]
        if proc.poll() is not None:
            assert proc.returncode == -signal.SIGKILL, f"{name} ended with {proc.returncode}, not by its crash point"
            restarts += 1
            assert restarts <= LIMIT + 2, f"{name} was restarted {restarts} times: the poison message is not contained"
            services.start(name, **env)
        await asyncio.sleep(0.1)
    return restarts


async def _run(services: Services, db_url: str, victim: str, point: str) -> tuple[Executions, str, list[str], int]:
    store = open_store(db_url)
    version = Registry(store).publish(parse_definition(WORKFLOW))
    executions = Executions(store)
    poison = str(uuid.uuid4())
    crash = {"WEFT_CRASH_AT": f"{point}@{poison}"}
    for name in ("orchestrator", "relay", "worker"):
        services.start(name, **(crash if name == victim else {}))
    ids = [executions.start(version, {"items": [i, i + 1]})[0].id for i in range(4)]
    executions.start(version, {"items": [0]}, execution_id=poison)
    ids += [executions.start(version, {"items": [i, i + 1]})[0].id for i in range(4, 8)]
    done = asyncio.Event()
    supervisor = asyncio.create_task(_supervise(services, victim, crash, done))

    async def all_finished() -> bool:
        states = await asyncio.to_thread(lambda: [executions.load(i, fresh=True) for i in [*ids, poison]])
        return all(s.finished for s in states)

    try:
        await wait_until(all_finished, timeout=_patience(services), interval=0.25, what="every execution to finish")
    finally:
        done.set()
        restarts = await supervisor
    return executions, poison, ids, restarts


def _check(executions: Executions, poison: str, ids: list[str], restarts: int, who: str) -> None:
    assert restarts == LIMIT, f"{who} was killed {restarts} times, not {LIMIT}"
    history = executions.history(poison)
    kinds = [e.type for e in history]
    assert kinds[-3:] == ["StepFailed", "StepDeadLettered", "ExecutionFailed"], kinds
    failed = history[-3]
    assert failed.step_id == "a" and failed.error_type == "PoisonMessage" and failed.retryable is False
    assert f"delivered {LIMIT + 1} times without being acknowledged" in failed.error_message
    assert who in failed.error_message
    for eid in ids:
        history = executions.history(eid)
        assert_applied_once(history)
        assert history[-1].type == "ExecutionCompleted", (eid, [e.type for e in history][-4:])


async def test_a_command_that_kills_the_worker(services: Services, db_url: str) -> None:
    executions, poison, ids, restarts = await _run(services, db_url, "worker", "worker.handle")
    _check(executions, poison, ids, restarts, "worker")
    executions.store.close()


async def test_a_result_that_kills_the_orchestrator(services: Services, db_url: str) -> None:
    executions, poison, ids, restarts = await _run(services, db_url, "orchestrator", "orchestrator.handle")
    _check(executions, poison, ids, restarts, "orchestrator")
    executions.store.close()
    # The result itself is in the dead-letter stream, with its reason.
    transport = await _connect(services)
    reader: list[Any] = []

    async def poisoned() -> list[Any]:
        return [h for h in await _dead_letters(transport, reader) if h[0].get(KIND_HEADER) == "poison"]

    try:
        found = await wait_until(poisoned, timeout=30, interval=0.25, what="the poison result's dead letter")
        await asyncio.sleep(1.0)
        found = await poisoned()
        assert len(found) == 1, [h for h, _ in found]
        headers, data = found[0]
        assert headers[SOURCE_SUBJECT_HEADER].endswith(poison) and poison in data.decode()
        assert "without being acknowledged" in headers[REASON_HEADER]
    finally:
        await transport.close()


async def test_a_trigger_that_kills_the_trigger_consumer(services: Services, db_url: str) -> None:
    store = open_store(db_url)
    Registry(store).publish(parse_definition("name: on-poke\non: [{event: poke.done}]\nsteps:\n  - {id: a, type: noop}\n"))
    executions = Executions(store)
    crash = {"WEFT_CRASH_AT": "triggers.handle@poison-1"}
    services.start("triggers", **crash)
    for name in ("orchestrator", "relay", "worker"):
        services.start(name)
    transport = await _connect(services)
    reader: list[Any] = []
    events = [f"ok-{i}" for i in range(4)] + ["poison-1"] + [f"ok-{i}" for i in range(4, 8)]
    try:
        await transport.ensure_streams()
        for event_id in events:
            body = {"specversion": "1.0", "id": event_id, "source": "tests", "type": "poke.done", "data": {}}
            await transport.publish(OutMessage(trigger_subject("poke.done"), orjson.dumps(body), msg_id=event_id))
        done = asyncio.Event()
        supervisor = asyncio.create_task(_supervise(services, "triggers", crash, done))
        ids = [trigger_execution_id("on-poke", "tests", e) for e in events if e != "poison-1"]

        async def completed() -> bool:
            states = await asyncio.to_thread(lambda: [executions.load(i, fresh=True) for i in ids])
            return all(s.status == "completed" for s in states)

        async def dead_lettered() -> list[Any]:
            return [m for m in await _dead_letters(transport, reader) if m[0].get(KIND_HEADER) == "trigger_failed"]

        try:
            await wait_until(completed, timeout=_patience(services), interval=0.25, what="every other trigger's execution")
            letters = await wait_until(dead_lettered, timeout=60, interval=0.25, what="the poison trigger's dead letter")
        finally:
            done.set()
            restarts = await supervisor
        assert restarts == LIMIT
        assert len(letters) == 1 and b"poison-1" in letters[0][1]
        assert "without being acknowledged" in letters[0][0][REASON_HEADER]
        poisoned = await asyncio.to_thread(executions.load, trigger_execution_id("on-poke", "tests", "poison-1"))
        assert poisoned.version == 0  # it never started anything
    finally:
        await transport.close()
        store.close()
