"""The claim check's throughput: storing and resolving large payloads (services/payloads.py).

    python bench/payloads.py --db sqlite --sizes 1,10 --rounds 20
    python bench/payloads.py --db postgresql://postgres@127.0.0.1:5432/test --sizes 1,10
    python bench/payloads.py --hot-path     # what the check adds to one small step, in µs

For each size (MiB) it times, on distinct values (no dedup shortcut):
  store    what the worker does after a step with a big output: encode to JSON, SHA-256,
           insert into the blob table (Claims.store_output);
  resolve  what the worker does before a step whose input holds a reference: select,
           check the SHA-256, decode (Claims.resolve).
It prints MiB/s and ms per payload for each, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contracts.payloads import MIB, PayloadLimits  # noqa: E402
from services.payloads import Claims  # noqa: E402
from services.store import open_store  # noqa: E402


def hot_path(rounds: int = 200_000) -> dict[str, float]:
    """What the policy adds to one step of a small workflow, in µs: the check of an execution's
    input, the measure of a StepScheduled and a StepSucceeded before they are appended, the
    worker's measure of an output and its look for a reference in a command."""
    import timeit
    from datetime import datetime, timezone

    from contracts import events as ev
    from contracts.payloads import MARKER, encode, guard, measure

    limits = PayloadLimits()
    now = datetime.now(timezone.utc)
    value = {"order": "o-1", "qty": 3, "items": ["a", "b"], "note": "x" * 80}
    scheduled = ev.StepScheduled(at=now, step_id="s", attempt=1, step_type="noop", idempotency_key="k", input=value)
    data = ev.encode(scheduled)
    checks = {
        "input_check": lambda: measure(value, limits, "input"),
        "event_measure": lambda: len(data) > limits.inline,
        "output_measure": lambda: len(encode(value)) > limits.inline,
        "command_marker": lambda: MARKER in data,
        "context_guard": lambda: (guard(value), guard(value)),
    }
    return {name: round(min(timeit.repeat(fn, number=rounds, repeat=3)) / rounds * 1e6, 3)
            for name, fn in checks.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default="sqlite", help="'sqlite' or a postgresql:// URL")
    parser.add_argument("--sizes", default="1,10", help="payload sizes in MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--hot-path", action="store_true", help="time what the policy adds to a small step, then stop")
    args = parser.parse_args()
    if args.hot_path:
        figures = hot_path()
        for name, us in figures.items():
            print(f"{name:>15}: {us:6.3f} µs")
        print(orjson.dumps({"hot_path_us": figures, "per_step_us": round(sum(figures.values()), 3)}).decode())
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.db == "sqlite":
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        else:
            url = f"{args.db}{'&' if '?' in args.db else '?'}schema=bench_{uuid.uuid4().hex[:8]}"
        store = open_store(url)
        claims = Claims.on(store, PayloadLimits(maximum=256 * MIB))
        figures: dict[str, float] = {}
        try:
            for size in (int(s) for s in args.sizes.split(",")):
                values = [{"rows": [f"{r}-{i}-" + "v" * 90 for i in range(size * MIB // 100)]} for r in range(args.rounds)]
                nbytes = sum(len(orjson.dumps(v)) for v in values)
                t0 = time.perf_counter()
                refs = [claims.store_output(v) for v in values]
                stored = time.perf_counter() - t0
                t0 = time.perf_counter()
                for ref, v in zip(refs, values):
                    assert claims.resolve({"x": ref})["x"] == v
                resolved = time.perf_counter() - t0
                for name, secs in (("store", stored), ("resolve", resolved)):
                    rate = nbytes / MIB / secs
                    per = secs / args.rounds * 1000
                    figures[f"{name}_{size}mib_mib_s"] = round(rate, 1)
                    figures[f"{name}_{size}mib_ms"] = round(per, 1)
                    print(f"{args.db.split(':')[0]:>10} {size:>3} MiB {name:>8}: {rate:7.1f} MiB/s  {per:7.1f} ms/payload")
        finally:
            if store.dialect == "postgresql":
                with store.transaction() as tx:
                    tx.execute(f"DROP SCHEMA {store.schema} CASCADE")  # type: ignore[attr-defined]
            store.close()
    print(orjson.dumps({"db": args.db.split(":")[0], "rounds": args.rounds, **figures}).decode())


if __name__ == "__main__":
    main()
