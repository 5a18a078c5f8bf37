"""Past one machine: Weft on a 3-node JetStream cluster, one node SIGKILLed at a time
(the streams' leader first), under load (issue 18, part 5).

The services get the three seed URLs (`WEFT_NATS_URL=nats://a,nats://b,nats://c`)
and create their streams with 3 replicas (`WEFT_NATS_REPLICAS=3`). Nothing may be
lost or applied twice, and completions may pause no longer than a leader
election (JetStream's raft groups elect in 4-9 s).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from contracts.definitions import parse_definition
from contracts.subjects import STEPS_STREAM
from services.orchestrator.executions import Executions
from services.orchestrator.registry import Registry
from services.store import StoreError, open_store
from tests.nats_cluster import NatsCluster
from tests.pg_cluster import pg_cluster  # noqa: F401 - the fixture
from tests.support import Services, assert_applied_once, service_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

WORKFLOW = """
name: clustered
steps:
  - {id: a, type: noop}
  - {id: each, type: transform, needs: [a], map: "${{ input.items }}", with: {expression: "@"}}
  - {id: b, type: noop, needs: [each]}
output: "${{ steps.each.output }}"
"""


def _at(record: Any) -> float:
    return datetime.fromisoformat(orjson.loads(record.data)["at"]).timestamp()


async def _leader(url: str, stream: str) -> str | None:
    nc = await nats.connect(servers=url.split(","), connect_timeout=2, max_reconnect_attempts=2)
    try:
        info = await nc.jetstream(timeout=3).stream_info(stream)
        return info.cluster.leader if info.cluster else None
    except Exception:  # noqa: BLE001 - mid-election: no leader to name
        return None
    finally:
        await nc.close()


async def test_a_node_at_a_time_dies_and_nothing_is_lost(tmp_path: Path, pg_cluster) -> None:  # noqa: F811
    cluster = NatsCluster(tmp_path / "nats")
    cluster.start_all()
    env = service_env(tmp_path, pg_cluster.url, cluster.url, prefix="k")
    env.pop("WEFT_ACK_WAIT")
    env.update({"WEFT_NATS_REPLICAS": "3", "WEFT_LOG_LEVEL": "WARNING"})
    svc = Services(env, tmp_path / "logs")
    store = open_store(pg_cluster.url)
    try:
        version = Registry(store).publish(parse_definition(WORKFLOW))
        executions = Executions(store)
        for name in ("orchestrator", "relay", "worker"):
            svc.start(name)
        stream = f"{STEPS_STREAM}_{env['WEFT_NAMESPACE'].upper()}"
        leader = await wait_until(lambda: _leader(cluster.url, stream), timeout=60, what="the streams to have leaders")

        fed: list[int] = []
        feeding = asyncio.Event()
        feeding.set()

        async def feed() -> None:  # a steady load until the last node is back
            i = 0
            while feeding.is_set():
                while True:
                    try:
                        await asyncio.to_thread(executions.start, version, {"items": [i, i + 1]},
                                                idempotency_key=f"k-{i}")
                        break
                    except StoreError:
                        await asyncio.sleep(0.1)
                fed.append(i)
                i += 1
                await asyncio.sleep(0.1)

        async def completions() -> list[float]:
            records = await asyncio.to_thread(store.read, 0, 100_000, ["ExecutionCompleted"])
            return [_at(r) for r in records]

        feeder = asyncio.create_task(feed())
        order = sorted(range(cluster.size), key=lambda i: cluster.name(i) != leader)  # the leader first
        stalls = []
        for i in order:
            await asyncio.sleep(2.0)
            cluster.kill(i)
            killed = time.time()
            await asyncio.sleep(2.0)
            cluster.start(i)

            # The next kill waits for this one's election: completions have resumed.
            async def resumed(since: float = killed) -> list[float]:
                return [t for t in await completions() if t > since]

            after = await wait_until(resumed, timeout=60, interval=0.1, what="completions to resume after the kill")
            stalls.append(round(min(after) - killed, 2))
        feeding.clear()
        await feeder
        ids = [executions.start(version, {"items": [i, i + 1]}, idempotency_key=f"k-{i}")[0].id for i in fed]

        async def done() -> bool:
            states = await asyncio.to_thread(lambda: [executions.load(i, fresh=True) for i in ids])
            return all(s.finished for s in states)

        await wait_until(done, timeout=120, interval=0.5, what="every execution to finish")
        for i, eid in zip(fed, ids):
            history = executions.history(eid)
            assert_applied_once(history)
            assert history[-1].type == "ExecutionCompleted", history[-1]
            assert history[-1].output == [i, i + 1]
        assert all(p.poll() is None for p in svc.procs.values()), "a service exited on its own"
        print(f"\n3-node cluster, {len(ids)} executions: leader {leader} killed first; the first completion "
              f"after each kill came {stalls} s after it")
        assert max(stalls) < 20, stalls  # a loose bound: elections take 4-9 s
    finally:
        svc.stop_all()
        store.close()
        cluster.stop_all()
