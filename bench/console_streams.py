"""Many live subscribers of `GET /v1/changes` at once, against a running stack.

    weft up --home /tmp/streams &                  # any running stack; auth off on loopback
    python bench/console_streams.py --home /tmp/streams [--streams 50] [--requests 200] [--key KEY]

Measures GET /v1/whoami latency (p50/p95, ms) with no stream open, then with N streams open
(each a raw connection that reads what it gets), the time from starting an execution until
every stream has seen its `ExecutionStarted`, and what one more stream than the limit gets
(one key, or every caller with auth off, may hold half of WEFT_GATEWAY_MAX_STREAMS=100: the
51st is a 503). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx


def _open(url: str, key: str | None, seen: dict[int, bytes], i: int, stop: threading.Event) -> socket.socket:
    parts = urlsplit(url)
    s = socket.create_connection((parts.hostname, parts.port), timeout=30)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    s.sendall(f"GET /v1/changes HTTP/1.1\r\nHost: {parts.netloc}\r\n{auth}\r\n".encode())

    def read() -> None:
        buf = b""
        while not stop.is_set():
            try:
                chunk = s.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf = (buf + chunk)[-65536:]
            seen[i] = buf

    threading.Thread(target=read, daemon=True).start()
    return s


def _latency(client: httpx.Client, n: int) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        assert client.get("/v1/whoami").status_code == 200
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return round(statistics.median(times), 2), round(times[int(len(times) * 0.95) - 1], 2)


def main(url: str, streams: int, requests: int, key: str | None, workflow: str) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out: dict[str, object] = {"streams": streams}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        out["whoami_ms_idle"] = _latency(client, requests)
        stop, seen = threading.Event(), {}
        socks = [_open(url, key, seen, i, stop) for i in range(streams)]
        deadline = time.monotonic() + 30
        while sum(1 for b in seen.values() if b.startswith(b"HTTP/1.1 200")) < streams:
            assert time.monotonic() < deadline, f"{len(seen)} of {streams} streams open"
            time.sleep(0.05)
        extra = _open(url, key, seen, -1, stop)
        time.sleep(0.5)
        out["one_more"] = seen.get(-1, b"")[:12].decode()
        extra.close()
        out["whoami_ms_with_streams"] = _latency(client, requests)
        t = time.perf_counter()
        r = client.post("/v1/executions", json={"workflow": workflow, "input": {}})
        assert r.status_code == 201, r.text
        eid = r.json()["id"].encode()
        while sum(1 for i, b in seen.items() if i >= 0 and eid in b) < streams:
            assert time.perf_counter() - t < 60, "not every stream saw the execution"
            time.sleep(0.01)
        out["fan_out_ms"] = round((time.perf_counter() - t) * 1000, 1)
        stop.set()
        for s in socks:
            s.close()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path(".weft"))
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--key")
    parser.add_argument("--workflow", default="hello")
    args = parser.parse_args()
    stack = json.loads((args.home / "stack.json").read_text())
    print(json.dumps(main(stack["gateway_url"], args.streams, args.requests, args.key, args.workflow)))
