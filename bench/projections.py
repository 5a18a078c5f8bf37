"""Projection catch-up benchmark: how fast the status views follow a large history.

    python bench/projections.py --db postgresql://postgres@127.0.0.1:5432/test --events 500000
    python bench/projections.py --db sqlite --events 200000

1. Records a few real executions through the pure core and the store (linear,
   fan-out/fan-in, retried, dead-lettered), as templates.
2. Generates a realistic history of --events events from them: a few hundred
   executions in flight at once, their events interleaved in the log as the
   orchestrator appends them, each execution with its own id. The events are
   pre-built and appended in large batches (this part is not what is measured).
3. Times a cold catch-up of all the built-in views (executions, step runs,
   timeline, workflow stats, dead letters) from position 0 to the head, then a
   `rebuild` of the executions view (shadow tables + swap) and of the dead-letter view.

Prints the figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import drop_schema, prepare_db  # noqa: E402 - bench/common.py
from contracts.definitions import parse_definition  # noqa: E402
from services.orchestrator.executions import Executions  # noqa: E402
from services.orchestrator.registry import Registry  # noqa: E402
from services.projections import DeadLettersView, ExecutionsView, Projector, default_views, rebuild  # noqa: E402
from services.store import EventStore, NewEvent, open_store  # noqa: E402
from tests.golden.drive import Clock, Driver, echo, flaky  # noqa: E402

SHAPES = {
    "linear": """
name: bench-linear
steps:
  - {id: fetch, type: noop}
  - {id: parse, type: noop, needs: [fetch]}
  - {id: enrich, type: noop, needs: [parse]}
  - {id: store, type: noop, needs: [enrich]}
  - {id: notify, type: noop, needs: [store]}
output: "${{ steps.store.output }}"
""",
    "fanout": """
name: bench-fanout
steps:
  - {id: split, type: noop}
  - {id: each, type: noop, needs: [split], map: "${{ input.items }}"}
  - {id: join, type: noop, needs: [each]}
output: "${{ steps.join.output }}"
""",
    "failing": """
name: bench-failing
steps:
  - {id: load, type: noop}
  - id: charge
    type: noop
    needs: [load]
    retry: {max_attempts: 3, initial_delay: 0.1}
""",
}


def _refuse(state: Any, step_id: str, item: Any, task: Any) -> tuple[str, Any]:
    from contracts.messages import StepError

    if step_id == "charge":
        return "failed", StepError(type="CardDeclined", message="card declined by issuer")
    return echo(state, step_id, item, task)


def templates(variants: int) -> list[list[tuple[str, bytes, str]]]:
    """Real histories recorded through the core: [(type, data, execution id)] each."""
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/templates.db")
        out = []
        for i in range(variants):
            ex = Executions(store, clock=Clock(tick=0.003 + 0.002 * (i % 7)))
            reg = Registry(store)
            cases = [
                ("linear", {"order": i, "customer": f"c-{i}"}, echo),
                ("linear", {"order": i + 1, "customer": f"c-{i}"}, flaky(3)),
                ("fanout", {"items": list(range(10)), "batch": i}, echo),
                ("failing", {"amount": 10 + i}, _refuse),
            ]
            for shape, data, behaviour in cases:
                v = reg.publish(parse_definition(SHAPES[shape]))
                eid = ex.start(v, data)[0].id
                Driver(ex).run([eid], behaviour)
                out.append([(r.type, r.data, eid) for r in store.load(uuid.UUID(eid))])
        store.close()
    return out


def generate(store: EventStore, total: int, in_flight: int = 300, batch: int = 10_000, seed: int = 7) -> int:
    """Append about `total` events of interleaved executions; returns how many were appended."""
    rng = random.Random(seed)
    shapes = templates(12)
    for text in SHAPES.values():
        Registry(store).publish(parse_definition(text))
    flying: list[list[Any]] = []  # [stream id, template, next index, old id bytes, new id bytes]
    pending: list[NewEvent] = []
    written = 0
    made = 0
    while written + len(pending) < total or flying:
        while len(flying) < in_flight and written + len(pending) + 30 * len(flying) < total:
            tpl = shapes[made % len(shapes)]
            made += 1
            sid = uuid.uuid4()
            flying.append([sid, tpl, 0, tpl[0][2].encode(), str(sid).encode()])
        if not flying:
            break
        i = rng.randrange(len(flying))
        f = flying[i]
        sid, tpl, at, old, new = f
        step = min(rng.choice((1, 1, 2, 3)), len(tpl) - at)  # the core appends a few events at a time
        for k in range(at, at + step):
            kind, data, _ = tpl[k]
            pending.append(NewEvent(sid, k + 1, kind, data.replace(old, new)))
        f[2] = at + step
        if f[2] >= len(tpl):
            flying[i] = flying[-1]
            flying.pop()
        if len(pending) >= batch:
            store.append(pending)
            written += len(pending)
            pending = []
    if pending:
        store.append(pending)
        written += len(pending)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="PostgreSQL URL (a fresh schema is used and dropped), or 'sqlite'")
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=10_000, help="projector batch size")
    parser.add_argument("--lanes", type=int, default=2, help="parallel view transactions (PostgreSQL)")
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL schema")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    db = args.db.split("?")[0]
    url, schema = prepare_db(db, Path(tmp.name))
    backend = "sqlite" if schema is None else "postgresql"
    store = open_store(url)
    try:
        t0 = time.perf_counter()
        n = generate(store, args.events)
        gen_s = time.perf_counter() - t0
        head = store.head()
        print(f"generated {n} events ({head} positions) in {gen_s:.1f}s ({n / gen_s:,.0f} events/s appended)")

        views = default_views()
        with Projector(store, views, batch=args.batch, lanes=args.lanes) as projector:
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            applied = projector.catch_up()
            catch_s = time.perf_counter() - t0
        rate = head / catch_s
        print(f"cold catch-up, {len(views)} views, batch {args.batch}, {args.lanes} lane(s): {head} events in {catch_s:.1f}s "
              f"= {rate:,.0f} events/s  ({os.cpu_count()} CPUs, load {load:.1f} before)")

        t0 = time.perf_counter()
        result = rebuild(store, ExecutionsView(), batch=args.batch)
        rebuild_s = time.perf_counter() - t0
        print(f"rebuild of the executions view (shadow + swap): {rebuild_s:.1f}s = {head / rebuild_s:,.0f} events/s")
        t0 = time.perf_counter()
        rebuild(store, DeadLettersView(), batch=args.batch)
        dead_s = time.perf_counter() - t0
        with store.transaction() as tx:
            tx.execute("SELECT COUNT(*) FROM weft_executions")
            executions = tx.fetchone()[0]
            tx.execute("SELECT COUNT(*) FROM weft_timeline")
            timeline_rows = tx.fetchone()[0]
            tx.execute("SELECT COUNT(*) FROM weft_dead_letters")
            dead_letters = tx.fetchone()[0]
        print(f"rebuild of the dead-letter view ({dead_letters} dead letters, each reading its execution's history): "
              f"{dead_s:.1f}s = {head / dead_s:,.0f} events/s")
        print(f"  {executions} executions, {timeline_rows} timeline rows")
        print(orjson.dumps({
            "bench": "projections", "backend": backend, "events": head, "executions": executions,
            "batch": args.batch, "lanes": args.lanes, "cpus": os.cpu_count(), "load_before": round(load, 2),
            "catch_up_s": round(catch_s, 2), "catch_up_events_per_s": round(rate),
            "rebuild_executions_s": round(rebuild_s, 2), "rebuild_events_per_s": round(head / rebuild_s),
            "views": len(views), "dead_letters": dead_letters, "rebuild_dead_letters_s": round(dead_s, 2),
            "generate_s": round(gen_s, 2), "applied": applied, "rebuild_generation": result.generation,
        }).decode())
    finally:
        store.close()
        if not args.keep:
            drop_schema(db, schema)
        tmp.cleanup()


if __name__ == "__main__":
    main()
