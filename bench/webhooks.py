"""Signed webhooks through the real gateway: requests/s, and what remembering each signature costs.

    python bench/webhooks.py --requests 500 [--db sqlite|postgresql://...] [--concurrency 8]

Starts a NATS server and the gateway (with the trigger path) in this process on a fresh
store, publishes a workflow listening on a signed webhook, then sends N distinct signed
deliveries (`t=...,v1=...`, each with its own delivery id) from C concurrent clients,
once as shipped and once with the one-delivery-per-signature record switched off, and
prints both rates and one JSON line. Traffic goes to 127.0.0.1 only.
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

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.broker.nats_server import NatsServer  # noqa: E402
from services.gateway import routes_triggers  # noqa: E402
from services.settings import Settings  # noqa: E402
from services.stack import run_services  # noqa: E402
from services.triggers.webhooks import sign  # noqa: E402

SECRET_ENV, SECRET = "WEFT_BENCH_HOOK_SECRET", "bench-secret"
FLOW = f"name: hooked\non: [{{webhook: {{path: /bench, secret_env: {SECRET_ENV}}}}}]\nsteps: [{{id: a, type: noop}}]\n"


async def _send(url: str, n: int, concurrency: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        queue = list(range(n))

        async def one_client() -> None:
            while queue:
                i = queue.pop()
                body = orjson.dumps({"n": i, "run": uuid.uuid4().hex})
                r = await c.post("/v1/webhooks/bench", content=body, headers={
                    "content-type": "application/json", "X-Weft-Delivery": f"d-{uuid.uuid4().hex}",
                    "X-Weft-Signature": sign(SECRET, body, int(time.time()))})
                assert r.status_code == 202, r.text

        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return n / (time.perf_counter() - began)


async def main(args: argparse.Namespace) -> dict[str, float]:
    os.environ[SECRET_ENV] = SECRET
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            db = f"sqlite:///{tmp}/weft.db" if args.db == "sqlite" else args.db
            settings = Settings(home=Path(tmp), database_url=db, nats_url=server.url, gateway_auth=False,
                                namespace=f"b{uuid.uuid4().hex[:8]}")
            stop = asyncio.Event()
            ready: asyncio.Future = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(run_services(settings, ("gateway",), stop, on_ready=ready.set_result))
            stack = await ready
            url = stack.gateway.url
            async with httpx.AsyncClient(base_url=url) as c:
                r = await c.post("/v1/workflows", content=FLOW, headers={"content-type": "application/yaml"})
                assert r.status_code in (200, 201), r.text
            await _send(url, 20, 2)  # warm up
            shipped = await _send(url, args.requests, args.concurrency)
            original = routes_triggers.claim_signature
            routes_triggers.claim_signature = lambda *a, **k: None  # type: ignore[assignment]
            try:
                without = await _send(url, args.requests, args.concurrency)
            finally:
                routes_triggers.claim_signature = original
            stop.set()
            await task
        finally:
            server.stop()
    return {"requests": args.requests, "per_s": round(shipped, 1), "per_s_without_signature_record": round(without, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--db", default="sqlite")
    result = asyncio.run(main(parser.parse_args()))
    print(f"{result['per_s']:.0f} signed webhooks/s ({result['per_s_without_signature_record']:.0f}/s without "
          "the one-delivery-per-signature record)")
    print(orjson.dumps(result).decode())
