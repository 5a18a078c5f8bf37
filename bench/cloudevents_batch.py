"""CloudEvents into `POST /v1/triggers`: one batch request against one request per event.

    weft up --home /tmp/ce &                       # any running stack; auth off on loopback
    weft workflows publish examples/order-received.yaml --home /tmp/ce
    python bench/cloudevents_batch.py --home /tmp/ce [--events 1000] [--concurrency 8] [--key KEY]

Sends N events of type `order.created` as one `application/cloudevents-batch+json` request,
then N more one by one in binary mode (the SDK's `to_binary`, C in flight), from the official
SDK, and prints both wall times and rates and one JSON line. Every event has its own id, so
each starts one execution of every workflow subscribed to the type.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

import httpx
from cloudevents.core.bindings import http
from cloudevents.core.v1.event import CloudEvent


def _event(run: str, kind: str, n: int) -> CloudEvent:
    return CloudEvent({"type": "order.created", "source": f"bench-{run}", "id": f"{kind}-{n}"},
                      {"order_id": f"A-{n}", "region": "eu"})


async def main(url: str, n: int, concurrency: int, key: str | None) -> dict[str, float]:
    run = uuid.uuid4().hex[:8]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        body = json.dumps([json.loads(http.to_structured_event(_event(run, "batch", i)).body) for i in range(n)])
        t = time.perf_counter()
        r = await client.post(url, content=body, headers={"content-type": "application/cloudevents-batch+json"})
        batch = time.perf_counter() - t
        assert r.status_code == 202 and r.json()["accepted"] == n, r.text[:500]
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            m = http.to_binary_event(_event(run, "single", i))
            async with gate:
                answer = await client.post(url, content=m.body, headers=m.headers)
            assert answer.status_code == 202, answer.text[:500]

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        single = time.perf_counter() - t
    return {"events": n, "batch_s": round(batch, 3), "batch_events_per_s": round(n / batch),
            "single_s": round(single, 3), "single_events_per_s": round(n / single), "concurrency": concurrency}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="the home of a running `weft up` (its stack.json)")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--key", default=None, help="an API key with the trigger scope, if auth is on")
    args = parser.parse_args()
    gateway = json.loads((args.home / "stack.json").read_text())["gateway_url"]
    got = asyncio.run(main(gateway + "/v1/triggers", args.events, args.concurrency, args.key))
    print(f"{got['events']} events: one batch request {got['batch_s']:.2f} s ({got['batch_events_per_s']} events/s); "
          f"one binary request each, {got['concurrency']} in flight, {got['single_s']:.2f} s "
          f"({got['single_events_per_s']} events/s)")
    print(json.dumps(got))
