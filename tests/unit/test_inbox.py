"""The inbox is pruned: old message ids are forgotten by the orchestrator's hourly task,
and the settings refuse a retention shorter than the broker's redelivery window."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.orchestrator.inbox import prune_inbox
from services.settings import Settings
from services.store import open_store


async def test_the_task_forgets_old_ids_and_stops_when_asked(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'weft.db'}")
    try:
        store.append([], inbox=["old-1", "old-2", "fresh"])
        with store.transaction() as tx:
            tx.execute("UPDATE inbox SET recorded_at = '2000-01-01T00:00:00.000Z' WHERE message_id LIKE 'old-%'")
        stop = asyncio.Event()
        task = asyncio.create_task(prune_inbox(store, stop, retention=3600, every=0.05))
        for _ in range(100):
            if not store.seen(["old-1", "old-2"]):
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        assert store.seen(["old-1", "old-2", "fresh"]) == {"fresh"}
    finally:
        store.close()


def test_a_retention_shorter_than_redelivery_is_refused() -> None:
    with pytest.raises(ValueError, match=r"WEFT_INBOX_RETENTION='100'.*ack_wait x max_deliver = 300s"):
        Settings.load({"WEFT_INBOX_RETENTION": "100", "WEFT_ACK_WAIT": "15"})
    assert Settings.load({"WEFT_INBOX_RETENTION": "300", "WEFT_ACK_WAIT": "15"}).inbox_retention == 300
