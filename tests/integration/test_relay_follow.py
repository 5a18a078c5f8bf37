"""The relay polls the log for StepScheduled: a flood of other events (dead letters) must be
walked once, not on every poll, and nothing scheduled after them may be missed."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from typing import Any, Sequence

import pytest

from contracts import events as ev
from contracts.subjects import STEPS_STREAM
from services.broker import NatsTransport
from services.orchestrator.relay import Relay
from services.store import EventStore, NewEvent, StoredRecord, open_store
from tests.fixtures_nats import wait_until

pytestmark = pytest.mark.integration


class Following:
    """The real store, with where each of the relay's reads started written down."""

    def __init__(self, store: EventStore):
        self.store = store
        self.starts: list[int] = []

    def follow(self, after: int, limit: int, types: Sequence[str]) -> tuple[list[StoredRecord], int]:
        self.starts.append(after)
        return self.store.follow(after, limit, types)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def _scheduled(stream: uuid.UUID, version: int, step: str) -> NewEvent:
    e = ev.StepScheduled(at=datetime.now(timezone.utc), step_id=step, attempt=1, step_type="noop",
                         idempotency_key=f"{stream}:{step}")
    return NewEvent(stream, version, e.type, ev.encode(e))


async def test_relay_reads_past_other_events_once(db_url: str, transport: NatsTransport) -> None:
    store = open_store(db_url)
    following = Following(store)
    relay = Relay(following, transport, poll_interval=0.01)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        a = uuid.uuid4()
        store.append([_scheduled(a, 1, "first")])
        await wait_until(lambda: relay.published == 1, message="the first step published")
        noise = store.append([NewEvent(uuid.uuid4(), 1, "DeadLetterRecorded", b"{}") for _ in range(300)])
        await wait_until(lambda: following.starts and following.starts[-1] >= noise[-1],
                         message="a read that starts past the dead letters")
        polls = len(following.starts)
        await asyncio.sleep(0.2)
        later = following.starts[polls:]
        assert len(later) >= 5 and all(after >= noise[-1] for after in later)  # none walks them again
        store.append([_scheduled(a, 2, "second")])
        await wait_until(lambda: relay.published == 2, message="the step after the dead letters published")
        consumer = await transport.consumer(STEPS_STREAM, "relay-follow-test")
        got: list[Any] = []
        while len(got) < 2:
            got += await consumer.fetch(10, timeout=2)
        assert sorted(m.msg_id for m in got) == [f"{a}:first:1", f"{a}:second:1"]
    finally:
        stop.set()
        await task
        store.close()
