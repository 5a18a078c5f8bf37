"""Starts through the public surface: HTTP single starts, HTTP batch starts, broker triggers.

    python bench/starts.py --db sqlite
    python bench/starts.py --db postgresql://postgres@127.0.0.1:5432/test --starts 10000 --in-flight 32
    python bench/starts.py --db ... --profile          # yappi over the stack's threads, top functions to stderr

Runs what `weft up` runs in front of the store (gateway, trigger consumer, relay;
add --with-stack for orchestrator, worker and projector too) in this process, on
a NATS server of its own, and drives it from a separate client process, so the
client's CPU is not the gateway's. Three phases, each on a fresh workflow:

  single   --starts N `POST /v1/executions`, --in-flight C at a time, each with an
           Idempotency-Key; timed from the first request to the last answer
  batch    the same N as `POST /v1/executions:batch` of --batch B items, --batch-in-flight at a time
  triggers --triggers T CloudEvents published on `weft.triggers.bench.start`, timed until
           the store holds T ExecutionStarted of that workflow

Every phase checks the store holds exactly what it asked for. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import Http1, drop_schema, prepare_db, running_services  # noqa: E402 - bench/common.py
from contracts.definitions import parse_definition  # noqa: E402
from services.broker.nats_server import NatsServer  # noqa: E402
from services.orchestrator.registry import Registry  # noqa: E402
from services.settings import Settings  # noqa: E402
from services.triggers.publish import new_event, to_message  # noqa: E402

WORKFLOW = """
name: {name}
on: [{{event: bench.{name}}}]
input_schema: {{type: object, required: [n], properties: {{n: {{type: integer}}}}}}
steps:
  - {{id: a, type: noop}}
  - {{id: b, type: noop, needs: [a]}}
"""


def count_started(store: Any, workflow: str) -> int:
    with store.reader() as tx:
        tx.execute("SELECT COUNT(*) FROM stored_events WHERE topic = ?", ("ExecutionStarted",))
        row = tx.fetchone()
    return int(row[0]) if row else 0


# ---- the client process -----------------------------------------------------------------------------


def _host_port(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port)


async def client_single(url: str, workflow: str, n: int, in_flight: int) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    host, port = _host_port(url)
    queue = iter(range(n))

    async def one_at_a_time() -> None:
        conn = Http1(host, port)
        try:
            for i in queue:
                body = orjson.dumps({"workflow": workflow, "input": {"n": i}})
                t = time.perf_counter()
                status, _ = await conn.post("/v1/executions", body, {"idempotency-key": f"s-{i}"})
                latencies.append(time.perf_counter() - t)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_at_a_time() for _ in range(in_flight)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"seconds": wall, "statuses": statuses, "client_cpu_ms_per_start": time.process_time() * 1000 / n,
            "p50_ms": latencies[len(latencies) // 2] * 1000, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


async def client_batch(url: str, workflow: str, n: int, batch: int, in_flight: int) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    host, port = _host_port(url)
    chunks = iter(range(0, n, batch))

    async def sender() -> None:
        conn = Http1(host, port)
        try:
            for start in chunks:
                items = [{"workflow": workflow, "input": {"n": i}, "idempotency_key": f"b-{i}"}
                         for i in range(start, min(n, start + batch))]
                status, body = await conn.post("/v1/executions:batch", orjson.dumps({"items": items}))
                if status != 200:
                    statuses[str(status)] = statuses.get(str(status), 0) + len(items)
                    continue
                for item in orjson.loads(body)["items"]:
                    statuses[str(item["status"])] = statuses.get(str(item["status"]), 0) + 1
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(in_flight)))
    wall = time.perf_counter() - t0
    return {"seconds": wall, "statuses": statuses, "client_cpu_ms_per_start": time.process_time() * 1000 / n}


def client_main(args: argparse.Namespace) -> None:
    if args.client == "single":
        out = asyncio.run(client_single(args.url, args.workflow, args.starts, args.in_flight))
    else:
        out = asyncio.run(client_batch(args.url, args.workflow, args.starts, args.batch, args.batch_in_flight))
    print(orjson.dumps(out).decode())


# ---- the stack process ------------------------------------------------------------------------------


def run_client(mode: str, url: str, workflow: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--client", mode, "--url", url, "--workflow", workflow,
           "--starts", str(args.starts), "--in-flight", str(args.in_flight), "--batch", str(args.batch),
           "--batch-in-flight", str(args.batch_in_flight)]
    done = subprocess.run(cmd, capture_output=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return orjson.loads(done.stdout.splitlines()[-1])


async def phase(stack: Any, name: str, mode: str, args: argparse.Namespace, profiler: Any) -> dict[str, Any]:
    store = stack.store
    await asyncio.to_thread(Registry(store).publish, parse_definition(WORKFLOW.format(name=name)))
    before = await asyncio.to_thread(count_started, store, name)
    expected = args.triggers if mode == "triggers" else args.starts
    gc = getattr(stack.gateway.app.state.ctx, "starts", None)
    flushes0, requests0 = (gc.flushes, gc.requests) if gc is not None else (0, 0)
    if profiler is not None:
        profiler.clear_stats()
        profiler.start()
    cpu0 = time.process_time()  # this process: the stack, all its threads (the client runs apart)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if mode == "triggers":
        events = [to_message(new_event(f"bench.{name}", {"n": i}, id=f"t-{i}", source="bench"))
                  for i in range(args.triggers)]
        t0 = time.perf_counter()
        await stack.transport.publish_many(events)
        while await asyncio.to_thread(count_started, store, name) - before < expected:
            await asyncio.sleep(0.02)
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("triggers: not all started in 10 minutes")
        seconds = time.perf_counter() - t0
    else:
        out = await asyncio.to_thread(run_client, mode, stack.gateway.url, name, args)
        seconds = out["seconds"]
        extra = {k: v for k, v in out.items() if k != "seconds"}
        if extra["statuses"] != {"201": expected}:
            raise RuntimeError(f"{mode}: unexpected answers {extra['statuses']}")
    cpu = time.process_time() - cpu0
    if profiler is not None:
        profiler.stop()
        print(f"\n--- profile: {mode} (yappi, all threads, top 30 by total time) ---", file=sys.stderr)
        stats = profiler.get_func_stats()
        stats.sort("tsub")
        stats.print_all(out=sys.stderr, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 8), 3: ("ttot", 8)},)
        for target in args.callers or ():  # yappi keeps children, not parents: walk every function's
            print(f"--- who calls {target} ---", file=sys.stderr)
            for f in stats:
                for child in f.children:
                    if child.full_name.endswith(target):
                        print(f"  {f.name} ({f.module.rsplit('/', 1)[-1]}:{f.lineno}) ncall={child.ncall}",
                              file=sys.stderr)
    stored = await asyncio.to_thread(count_started, store, name) - before
    if stored != expected:
        raise RuntimeError(f"{mode}: expected {expected} executions stored, found {stored}")
    gc = getattr(stack.gateway.app.state.ctx, "starts", None)
    if gc is not None and mode != "triggers":  # how many requests each transaction served
        extra["transactions"] = gc.flushes - flushes0
        extra["requests"] = gc.requests - requests0
    # CPU the stack spent per start: on a loaded machine the wall-clock rate says how much CPU we
    # were given, this says what a start costs (1000 / cpu_ms is the rate one free core would give).
    extra["stack_cpu_ms_per_start"] = cpu * 1000 / expected
    return {"path": mode, "count": expected, "seconds": round(seconds, 3), "per_s": round(expected / seconds, 1),
            **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in extra.items()}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="weft-bench-starts-"))
    server = NatsServer(store_dir=workdir / "nats").start()
    url, schema = prepare_db(args.db, workdir)
    settings = Settings(home=workdir, database_url=url, nats_url=server.url, namespace="benchstart",
                        gateway_auth=False, poll_interval=0.02, step_modules="examples,bench")
    parts = ("gateway", "triggers", "relay") + (("orchestrator", "worker", "projector") if args.with_stack else ())
    profiler = None
    if args.profile:
        import yappi

        yappi.set_clock_type("cpu")
        profiler = yappi
    results = []
    try:
        async with running_services(settings, parts) as stack:
            for mode in args.paths.split(","):
                print(f"running {mode} ...", file=sys.stderr)
                results.append(await phase(stack, f"bench-{mode}", mode, args, profiler))
    finally:
        server.stop()
        drop_schema(args.db, schema)
    return {"benchmark": "starts", "db": "sqlite" if args.db == "sqlite" else "postgresql",
            "load_average": [round(x, 2) for x in os.getloadavg()], "with_stack": args.with_stack,
            "in_flight": args.in_flight, "batch": args.batch, "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="sqlite", help="'sqlite' or a PostgreSQL URL (a fresh schema in it)")
    p.add_argument("--starts", type=int, default=5000)
    p.add_argument("--in-flight", type=int, default=32)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--batch-in-flight", type=int, default=2)
    p.add_argument("--triggers", type=int, default=20000)
    p.add_argument("--paths", default="single,batch,triggers")
    p.add_argument("--with-stack", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--callers", nargs="*", help="with --profile: print who calls these functions (by name)")
    p.add_argument("--client", choices=["single", "batch"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--workflow", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        return client_main(args)
    out = asyncio.run(run(args))
    print(f"\nstarts [{out['db']}], load average {out['load_average']}", file=sys.stderr)
    print(f"{'path':>9} {'count':>7} {'seconds':>8} {'per s':>9}  detail", file=sys.stderr)
    for r in out["results"]:
        detail = {k: v for k, v in r.items() if k not in ("path", "count", "seconds", "per_s")}
        print(f"{r['path']:>9} {r['count']:>7} {r['seconds']:>8} {r['per_s']:>9}  {detail}", file=sys.stderr)
    print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main()
