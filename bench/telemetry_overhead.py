"""What telemetry costs a step attempt on the worker: Worker.execute vs ObservedWorker.execute.

    python bench/telemetry_overhead.py            # tracing off (no OTEL_* set): metrics + log context only
    python bench/telemetry_overhead.py --traced   # tracing on, spans to an in-memory exporter

No broker, no store: `noop` steps executed in a loop, alternating the plain and the
observed worker (5 rounds of 20,000 each), and the median difference printed in
microseconds per attempt. The end-to-end comparison is bench/bench.py run on both
commits; this isolates the wrapper from the machine's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.messages import StepReady  # noqa: E402
from services.telemetry import tracing  # noqa: E402
from services.telemetry.observed import ObservedWorker  # noqa: E402
from services.worker.runtime import Worker  # noqa: E402
from services.worker.steps import HttpPolicy, default_registry  # noqa: E402


class _Transport:
    async def publish_many(self, messages: Any) -> None:
        pass


async def per_step(cls: type[Worker], n: int) -> float:
    worker = cls(_Transport(), default_registry(HttpPolicy()), worker_id="bench")  # type: ignore[arg-type]
    ready = StepReady(execution_id="e", workflow="wf", step_id="s", attempt=1, step_type="noop",
                      idempotency_key="k", scheduled_at=datetime.now(timezone.utc),
                      trace_id="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    began = time.perf_counter()
    for _ in range(n):
        await worker.execute(ready)
    return (time.perf_counter() - began) / n * 1e6


async def main(args: argparse.Namespace) -> None:
    if args.traced:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = TracerProvider()
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracing._enabled = True  # noqa: SLF001 - a benchmark's shortcut past setup()'s exporters
        tracing.tracer = lambda: provider.get_tracer("bench")  # type: ignore[assignment]
    for _ in range(2):  # warm up
        await per_step(Worker, 2000)
        await per_step(ObservedWorker, 2000)
    diffs = []
    for i in range(args.rounds):
        plain, observed = await per_step(Worker, args.steps), await per_step(ObservedWorker, args.steps)
        diffs.append(observed - plain)
        print(f"round {i + 1}: Worker {plain:.1f} us/step · ObservedWorker {observed:.1f} us/step · +{observed - plain:.1f} us")
    print(f"median overhead ({'tracing on' if args.traced else 'tracing off'}): {statistics.median(diffs):.1f} us per step attempt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traced", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20_000)
    asyncio.run(main(parser.parse_args()))
