"""The chaos suite (issue 18, part 4): every kind of fault, twice, under load.

Weft runs as separate processes (two orchestrators, the relay, two workers, the
projector and the dead-letter service) on a PostgreSQL cluster and a NATS server
of this test's own. Executions of a workflow with parallel branches and a map
arrive while the faults hit:

- SIGKILL of every service kind;
- `kill -9` of nats-server (it comes back on the same port and data);
- `pg_ctl -m immediate stop` of PostgreSQL;
- SIGTERM of a worker, an orchestrator and the relay (a rolling restart).

After quiescence it asserts that every execution completed exactly once with
the right output, no attempt had two accepted results, the executions view
agrees with the log, the dead-letter store is empty and no service exited on
its own. It prints the recovery time of each fault (the fault's end to the next
completion) and the execution durations; it asserts no tight timings.

`WEFT_CHAOS_SOAK=1` runs a longer soak (more executions, more rounds).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from contracts.definitions import parse_definition
from services.broker.nats_server import NatsServer
from services.deadletters.view import status_counts
from services.orchestrator.executions import Executions
from services.orchestrator.registry import Registry
from services.projections.executions import list_executions
from services.store import StoreError, open_store
from tests.pg_cluster import pg_cluster  # noqa: F401 - the fixture
from tests.support import Services, assert_applied_once, service_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

SOAK = os.environ.get("WEFT_CHAOS_SOAK", "") not in ("", "0")
ROUNDS = 4 if SOAK else 2  # each kind of fault, this many times
EXECUTIONS = 2000 if SOAK else 300

WORKFLOW = """
name: chaos
steps:
  - {id: a, type: noop}
  - {id: left, type: transform, needs: [a], with: {expression: "n"}, input: {n: "${{ input.n }}"}}
  - {id: right, type: sleep, needs: [a], with: {seconds: 0.05}}
  - {id: each, type: transform, needs: [left], map: "${{ input.items }}", with: {expression: "@"}}
  - {id: join, type: transform, needs: [each, right], with: {expression: "sum(xs)"}, input: {xs: "${{ steps.each.output }}"}}
output: {n: "${{ steps.left.output }}", sum: "${{ steps.join.output }}"}
"""
SERVICES = {"orchestrator-1": "orchestrator", "orchestrator-2": "orchestrator", "relay": "relay",
            "worker-1": "worker", "worker-2": "worker", "projector": "projector", "deadletters": "deadletters"}
KILLS = ["orchestrator-1", "orchestrator-2", "relay", "worker-1", "worker-2", "projector", "deadletters"]
TERMS = ["worker-1", "orchestrator-2", "relay"]


def _input(i: int) -> dict[str, Any]:
    return {"n": i, "items": [i, i + 1, i + 2]}


@dataclass
class Fault:
    kind: str  # sigkill | sigterm | nats | postgres
    target: str
    hit_at: float = 0.0  # wall clock when it struck
    ended_at: float = 0.0  # wall clock when the service (or server) was back
    recovery: float | None = None


@dataclass
class Chaos:
    svc: Services
    nats: NatsServer
    pg: Any
    faults: list[Fault] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)  # services found dead that we did not kill

    def check_alive(self, skip: str = "") -> None:
        for key, proc in self.svc.procs.items():
            if key != skip and proc.poll() is not None:
                self.exits.append(f"{key} exited with {proc.returncode}")
                self.svc.start(SERVICES[key], key)

    async def hit(self, fault: Fault) -> None:
        self.check_alive()
        fault.hit_at = time.time()
        if fault.kind == "sigkill":
            proc = self.svc.procs[fault.target]
            proc.kill()
            await asyncio.to_thread(proc.wait)
            await asyncio.sleep(0.5)
            self.svc.start(SERVICES[fault.target], fault.target)
        elif fault.kind == "sigterm":  # a rolling restart: the replacement starts as the old one drains
            proc = self.svc.procs.pop(fault.target)
            proc.send_signal(signal.SIGTERM)
            self.svc.start(SERVICES[fault.target], fault.target)
            await asyncio.to_thread(proc.wait, 30)
            # -SIGTERM: it was still starting (no handler yet), which is a clean stop too.
            if proc.returncode not in (0, -signal.SIGTERM):
                self.exits.append(f"{fault.target} exited with {proc.returncode} after SIGTERM")
        elif fault.kind == "nats":
            await asyncio.to_thread(self.nats.kill)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.nats.start)
        elif fault.kind == "postgres":
            await asyncio.to_thread(self.pg.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.pg.start)
        fault.ended_at = time.time()


async def _feed(executions: Executions, version: Any, total: int, seconds: float) -> None:
    """Start `total` executions evenly over `seconds`, through whatever the faults do."""
    gap = seconds / total
    for i in range(total):
        while True:
            try:  # an idempotency key: a start whose outcome was lost is retried, not doubled
                await asyncio.to_thread(executions.start, version, _input(i), idempotency_key=f"chaos-{i}")
                break
            except StoreError:
                await asyncio.sleep(0.2)
        await asyncio.sleep(gap)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def test_chaos(tmp_path: Path, pg_cluster) -> None:  # noqa: F811, PLR0915
    nats = NatsServer(tmp_path / "nats", sync="always")
    try:
        nats.start()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"NATS is required: {exc}")
    env = service_env(tmp_path, pg_cluster.url, nats.url, prefix="x")
    env.pop("WEFT_ACK_WAIT")  # the deployed defaults: ack_wait 4 s
    env.update({"WEFT_DRAIN_GRACE": "2", "WEFT_LOG_LEVEL": "WARNING"})
    svc = Services(env, tmp_path / "logs")
    store = await asyncio.to_thread(open_store, pg_cluster.url)
    chaos = Chaos(svc, nats, pg_cluster)
    try:
        version = await asyncio.to_thread(Registry(store).publish, parse_definition(WORKFLOW))
        executions = Executions(store)
        for key, name in SERVICES.items():
            svc.start(name, key)
        await asyncio.sleep(2.0)

        kinds = [Fault("sigkill", k) for k in KILLS] + [Fault("nats", "nats"), Fault("postgres", "postgres")]
        kinds += [Fault("sigterm", k) for k in TERMS]
        rng = random.Random(18)
        faults = []
        for _ in range(ROUNDS):
            batch = [Fault(f.kind, f.target) for f in kinds]
            rng.shuffle(batch)
            faults.extend(batch)
        pause = 2.0
        window = len(faults) * (pause + 1.5)
        started = time.time()
        feeder = asyncio.create_task(_feed(executions, version, EXECUTIONS, window))
        for fault in faults:
            await asyncio.sleep(pause)
            await chaos.hit(fault)
            chaos.faults.append(fault)
        await feeder
        ids = [executions.start(version, _input(i), idempotency_key=f"chaos-{i}")[0].id for i in range(EXECUTIONS)]

        async def quiet() -> bool:
            chaos.check_alive()
            states = await asyncio.to_thread(lambda: [executions.load(i, fresh=True) for i in ids])
            return all(s.finished for s in states)

        await wait_until(quiet, timeout=180, interval=0.5, what="every execution to finish")

        # -- exactly once, right output ------------------------------------------------
        durations, completions, spans = [], [], []
        slowest: list[Any] = []
        for i, eid in enumerate(ids):
            history = await asyncio.to_thread(executions.history, eid)
            assert_applied_once(history)
            assert history[-1].type == "ExecutionCompleted", (eid, history[-1])
            assert history[-1].output == {"n": i, "sum": 3 * i + 3}
            assert sum(1 for e in history if e.type == "ExecutionCompleted") == 1
            durations.append((history[-1].at - history[0].at).total_seconds())
            completions.append(history[-1].at.timestamp())
            spans.append((history[0].at.timestamp(), history[-1].at.timestamp()))
            if durations[-1] >= max(durations):
                slowest = [(round(e.at.timestamp() - history[0].at.timestamp(), 2), e.type,
                            getattr(e, "step_id", None), getattr(e, "item", None)) for e in history]

        # -- the views agree with the log; nothing dead-lettered -------------------------
        async def views_caught_up() -> bool:
            def read() -> tuple[list[dict[str, Any]], dict[str, int]]:
                with store.reader() as tx:
                    return list_executions(tx, workflow="chaos", limit=EXECUTIONS + 10), status_counts(tx)

            rows, dead = await asyncio.to_thread(read)
            return len(rows) == EXECUTIONS and all(r["status"] == "completed" for r in rows) and not dead

        await wait_until(views_caught_up, timeout=60, interval=0.5, what="the views to agree with the log")
        chaos.check_alive()
        assert not chaos.exits, chaos.exits

        # -- what it cost ---------------------------------------------------------------------
        completions.sort()
        for fault in chaos.faults:
            after = [t for t in completions if t > fault.ended_at]
            fault.recovery = (after[0] - fault.ended_at) if after else None
        report = {
            "executions": EXECUTIONS, "faults": len(chaos.faults), "seconds": round(time.time() - started, 1),
            "duration_p50": round(_pct(durations, 0.5), 3), "duration_p99": round(_pct(durations, 0.99), 3),
            "duration_max": round(max(durations), 3),
            "recovery": {kind: [round(f.recovery, 2) for f in chaos.faults if f.kind == kind and f.recovery is not None]
                         for kind in ("sigkill", "sigterm", "nats", "postgres")},
            # The longest execution that was in flight during a fault of each kind: what one fault costs.
            "worst_in_flight": {
                kind: round(max((end - start for start, end in spans for f in chaos.faults
                                 if f.kind == kind and start <= f.ended_at and end >= f.hit_at), default=0.0), 2)
                for kind in ("sigkill", "sigterm", "nats", "postgres")},
            "slowest": slowest,
            "faults_at": [(round(f.hit_at - started, 1), round(f.ended_at - started, 1), f.kind, f.target)
                          for f in chaos.faults],
            "recovery_by_target": {f"{f.kind}:{f.target}": round(f.recovery, 2) for f in chaos.faults
                                   if f.recovery is not None},
        }
        print("\nchaos:", orjson.dumps(report).decode())
        out = os.environ.get("WEFT_CHAOS_REPORT")
        if out:
            Path(out).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        print(f"  {EXECUTIONS} executions, {len(chaos.faults)} faults; duration p50 {report['duration_p50']}s "
              f"p99 {report['duration_p99']}s; median recovery "
              + ", ".join(f"{k} {statistics.median(v):.2f}s" for k, v in report["recovery"].items() if v)
              + "; longest execution in flight during a fault: "
              + ", ".join(f"{k} {v}s" for k, v in report["worst_in_flight"].items()))
    finally:
        svc.stop_all()
        store.close()
        nats.stop()
