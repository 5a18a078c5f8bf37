"""Bulk: 1,000 step dead letters reprocessed with one `weft dlq reprocess --workflow W`
complete every execution; running it again (by filter, then by all 1,000 ids) changes
nothing: no event is appended, every item reports `already_reprocessed`."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from services.deadletters import Filters, list_dead_letters
from tests.integration.test_dlq import Cli
from tests.support import finished_all, stack_up, wait_until
from weft import StepContext

pytestmark = pytest.mark.integration
N = 1000

BULK = """
name: bulk
steps:
  - id: work
    type: python
    with: {callable: "tests.integration.test_dlq_bulk:until_fixed"}
    input: {flag: "${{ input.flag }}", n: "${{ input.n }}"}
    retry: {max_attempts: 1}
output: "${{ steps.work.output }}"
"""


def until_fixed(input: dict[str, Any], ctx: StepContext) -> int:
    if not os.path.exists(input["flag"]):
        raise RuntimeError("downstream is down")
    return input["n"]


async def test_bulk_reprocess_of_a_thousand_and_again(tmp_path: Path, pg_url: str, nats_url: str) -> None:
    async with stack_up(tmp_path, pg_url, nats_url, concurrency=32) as running:
        store, cli, flag = running.stack.store, Cli(running, tmp_path), tmp_path / "downstream-up"
        version = await asyncio.to_thread(running.publish, BULK)
        ids = await asyncio.to_thread(
            running.stack.executions.start_many, version, [{"flag": str(flag), "n": i} for i in range(N)]
        )
        await finished_all(store, ids, "ExecutionFailed")

        def open_letters() -> list[dict[str, Any]]:
            with store.reader() as tx:
                return list_dead_letters(tx, Filters(workflow="bulk", status="open"), limit=N + 1)

        async def all_open() -> bool:
            return len(await asyncio.to_thread(open_letters)) == N

        await wait_until(all_open, timeout=30, interval=0.2, what="1,000 open dead letters")
        flag.touch()  # the cause is fixed

        outcomes = await cli.json("dlq", "reprocess", "--workflow", "bulk", "--why", "downstream back")
        assert len(outcomes) == N
        assert {(o["outcome"], o["attempt"]) for o in outcomes} == {("reprocessed", 2)}
        assert {o["execution_id"] for o in outcomes} == set(ids)
        await finished_all(store, ids, "ExecutionCompleted")

        head = await asyncio.to_thread(store.head)
        assert await cli.json("dlq", "reprocess", "--workflow", "bulk") == []  # nothing open is left
        again = await cli.json("dlq", "reprocess", *[o["id"] for o in outcomes])
        assert len(again) == N and {o["outcome"] for o in again} == {"already_reprocessed"}
        assert await asyncio.to_thread(store.head) == head  # the second run stored nothing

        sample = ids[:: N // 20]
        for eid in sample:
            history = await running.history(eid)
            assert [e.type for e in history if e.type in ("StepReprocessRequested", "ExecutionCompleted")] == [
                "StepReprocessRequested", "ExecutionCompleted"]
            assert [e.attempt for e in history if e.type == "StepScheduled"] == [1, 2]
        done = await cli.json("dlq", "list", "--workflow", "bulk", "--status", "reprocessed", "--limit", str(N + 1))
        assert len(done) == N and {d["action_reason"] for d in done} == {"downstream back"}
