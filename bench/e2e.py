"""End to end, through the public surface only: `weft up`, its HTTP gateway and the `weft` CLI.

    python bench/e2e.py                                  # SQLite, every case, a fresh `weft up`
    python bench/e2e.py --db postgresql://postgres@127.0.0.1:5432/test --cases latency,dispatch
    python bench/e2e.py --home ~/.weft --cases latency   # attach to a running `weft up`

Cases (`--cases`, comma-separated):

- throughput: the 5-step linear chain of `python` steps returning x + 1, `--executions` (1,000)
  started with `POST /v1/executions` at `--in-flight` (32) requests at once, timed until the
  executions view (`GET /v1/executions?status=completed`) lists them all completed.
- latency: one execution started over HTTP and awaited (polling `GET /v1/executions/{id}` every
  2 ms), `--sequential` (25) times one after another: p50/p95 of start → completed.
- dispatch: `--rate` (20) executions/s for `--seconds` (10); step-to-step dispatch p50/p99 from the
  events' own timestamps (a step finishing on a worker → the next one starting on a worker).
- map: one execution mapping over `--items` (10,000) items; its steps/s against throughput's.
- history: the same chain run in an execution whose history already holds `--history` (10,000)
  events (a map over half as many items first), per-step rate of the part after it.
- scale: starts, `weft status` and `weft executions list` with `--scale` (100,000) executions in
  the store, against 1,000 (the store is filled through the batch start of the gateway if it has
  one, else by POST /v1/executions).
- memory: RSS of `weft up` (and its children) with `--in-flight-memory` (5,000) executions
  in flight (steps that sleep), and once they are done.

Each figure is printed beside the load average of the machine; the last line is one JSON object.
Binds and connects to 127.0.0.1 only. Every wait is bounded (`--timeout`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import httpx

from common import Http1  # bench/common.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]

STEPS_PY = '''\
import time


def inc(x, ctx):
    return x + 1


def gen(n, ctx):
    return list(range(n))


def nap(seconds, ctx):
    time.sleep(seconds)
    return seconds


async def anap(seconds, ctx):
    import asyncio

    await asyncio.sleep(seconds)
    return seconds
'''


def chain(name: str, n: int = 5) -> str:
    steps = []
    for i in range(1, n + 1):
        prev = "${{ input.x }}" if i == 1 else f"${{{{ steps.s{i - 1}.output }}}}"
        needs = "" if i == 1 else f", needs: [s{i - 1}]"
        steps.append(f'  - {{id: s{i}, type: python, with: {{callable: "e2e_steps:inc"}}, input: "{prev}"{needs}}}')
    return f"name: {name}\nsteps:\n" + "\n".join(steps) + f'\noutput: "${{{{ steps.s{n}.output }}}}"\n'


def mapped(name: str, tail: int = 0) -> str:
    text = (f"name: {name}\nsteps:\n"
            '  - {id: gen, type: python, with: {callable: "e2e_steps:gen"}, input: "${{ input.n }}"}\n'
            '  - {id: each, type: python, needs: [gen], map: "${{ steps.gen.output }}", '
            'with: {callable: "e2e_steps:inc"}}\n')
    prev = "each"
    for i in range(1, tail + 1):
        text += (f'  - {{id: t{i}, type: python, needs: [{prev}], with: {{callable: "e2e_steps:inc"}}, '
                 f'input: "${{{{ input.x }}}}"}}\n')
        prev = f"t{i}"
    return text


def napping(name: str, callable_: str = "e2e_steps:anap") -> str:
    return (f"name: {name}\nsteps:\n"
            f'  - {{id: nap, type: python, with: {{callable: "{callable_}"}}, input: "${{{{ input.s }}}}", timeout: 600}}\n')


def load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _t(raw: str) -> datetime:
    return datetime.fromisoformat(raw.replace("Z", "+00:00"))


# ---- the stack -------------------------------------------------------------------------------


@contextmanager
def weft_up(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """A `weft up` of our own in a temporary home (or the one at --home), as stack.json describes it."""
    if args.home:
        home = Path(args.home)
        yield {**json.loads((home / "stack.json").read_text()), "home": str(home), "proc": None}
        return
    tmp = Path(tempfile.mkdtemp(prefix="weft-e2e-"))
    (tmp / "e2e_steps.py").write_text(STEPS_PY)
    env = {**os.environ, "WEFT_LOG_LEVEL": "WARNING", "WEFT_HOME": str(tmp / "home")}
    schema = None
    if args.db != "sqlite":
        schema = f"e2e_{uuid.uuid4().hex[:8]}"
        env["WEFT_DATABASE_URL"] = f"{args.db}?schema={schema}"
    for k, v in (args.env or []):
        env[k] = v
    cmd = [sys.executable, "-m", "weft", "up", "--home", str(tmp / "home"), "--steps", "e2e_steps"]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.concurrency:
        cmd += ["--concurrency", str(args.concurrency)]
    log = open(tmp / "up.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        stack_json = tmp / "home" / "stack.json"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weft up exited {proc.returncode}:\n{(tmp / 'up.log').read_text()[-3000:]}")
            if stack_json.exists():
                info = json.loads(stack_json.read_text())
                if info.get("gateway_url"):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("weft up was not ready after 60s")
            time.sleep(0.1)
        yield {**info, "home": str(tmp / "home"), "proc": proc, "cwd": str(tmp), "env": env}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
        if schema:
            import psycopg

            with psycopg.connect(args.db, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


class Api:
    def __init__(self, url: str, timeout: float):
        assert url.startswith(("http://127.0.0.1", "http://localhost")), url
        self.url = url
        self.retried = 0  # starts sent again after a broken connection
        self.http = httpx.AsyncClient(base_url=url + "/v1", timeout=timeout,
                                      limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))

    async def publish(self, text: str) -> None:
        r = await self.http.post("/workflows", content=text, headers={"Content-Type": "application/yaml"})
        r.raise_for_status()

    async def start(self, workflow: str, input: Any) -> str:
        # With an idempotency key, a request whose connection broke can be sent again safely.
        key = uuid.uuid4().hex
        for attempt in range(3):
            try:
                r = await self.http.post("/executions", json={"workflow": workflow, "input": input},
                                         headers={"Idempotency-Key": key})
                break
            except httpx.TransportError:
                if attempt == 2:
                    raise
                self.retried += 1
        r.raise_for_status()
        return r.json()["execution_id"]

    async def get(self, eid: str) -> dict[str, Any]:
        r = await self.http.get(f"/executions/{eid}")
        r.raise_for_status()
        return r.json()

    async def wait(self, eid: str, deadline: float, every: float = 0.002) -> dict[str, Any]:
        while True:
            doc = await self.get(eid)
            if doc["status"] not in ("running", "paused"):
                return doc
            if time.monotonic() > deadline:
                raise TimeoutError(f"execution {eid} still {doc['status']}")
            await asyncio.sleep(every)

    async def history(self, eid: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            r = await self.http.get(f"/executions/{eid}/history", params={"after": len(items), "limit": 10_000})
            r.raise_for_status()
            page = r.json()["items"]
            if not page:
                return items
            items += page

    async def count(self, workflow: str, status: str) -> int:
        n, cursor = 0, None
        while True:
            params = {"workflow": workflow, "status": status, "limit": 500}
            if cursor:
                params["cursor"] = cursor
            r = await self.http.get("/executions", params=params)
            r.raise_for_status()
            doc = r.json()
            n += len(doc["items"])
            cursor = doc.get("next_cursor")
            if not cursor:
                return n


def dispatch_latencies(history: list[dict[str, Any]]) -> list[float]:
    """Step-to-step dispatch (ms): a step's worker start minus its parents' latest worker finish."""
    needs: dict[str, tuple[str, ...]] = {}
    finished: dict[str, datetime] = {}
    started: dict[tuple[str, Any], datetime] = {}
    for e in history:
        if e["type"] == "ExecutionStarted":
            needs = {s["id"]: tuple(s.get("needs") or ()) for s in e["definition"]["steps"]}
        elif e["type"] == "StepSucceeded" and e.get("started_at"):
            started[(e["step_id"], e.get("item"))] = _t(e["started_at"])
            fin = _t(e["finished_at"])
            prev = finished.get(e["step_id"])
            finished[e["step_id"]] = fin if prev is None else max(prev, fin)
    out = []
    for (step_id, _item), start in started.items():
        parents = needs.get(step_id, ())
        if parents and all(p in finished for p in parents):
            out.append((start - max(finished[p] for p in parents)).total_seconds() * 1000)
    return out


def hops(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Where each hop's time goes, from the events' own clocks (ms): the worker's finish → the
    orchestrator's decision (`at` of the next StepScheduled) → the next worker's start."""
    out = []
    last_finish: datetime | None = None
    for e in history:
        if e["type"] == "StepSucceeded" and e.get("finished_at"):
            last_finish = _t(e["finished_at"])
        elif e["type"] == "StepScheduled" and last_finish is not None:
            decided = _t(e["at"])
            nxt = next((x for x in history if x["type"] == "StepSucceeded" and x["step_id"] == e["step_id"]), None)
            if nxt is not None:
                out.append({"result_to_decision": (decided - last_finish).total_seconds() * 1000,
                            "decision_to_worker": (_t(nxt["started_at"]) - decided).total_seconds() * 1000})
    return out


# ---- the cases -----------------------------------------------------------------------------


async def case_latency(api: Api, args: argparse.Namespace) -> dict[str, Any]:
    wf = f"e2e-lat-{uuid.uuid4().hex[:6]}"
    await api.publish(chain(wf))
    await api.wait(await api.start(wf, {"x": 0}), time.monotonic() + args.timeout)  # warm: imports, caches
    times, parts = [], []
    for i in range(args.sequential):
        t0 = time.perf_counter()
        eid = await api.start(wf, {"x": i})
        doc = await api.wait(eid, time.monotonic() + args.timeout)
        times.append((time.perf_counter() - t0) * 1000)
        assert doc["status"] == "completed" and doc["output"] == i + 5, doc
        parts += hops(await api.history(eid))
    r2d = [p["result_to_decision"] for p in parts]
    d2w = [p["decision_to_worker"] for p in parts]
    return {"case": "latency", "runs": len(times), "p50_ms": round(pct(times, 50), 1),
            "p95_ms": round(pct(times, 95), 1), "min_ms": round(min(times), 1),
            "hop_result_to_decision_p50_ms": round(pct(r2d, 50), 2),
            "hop_decision_to_worker_p50_ms": round(pct(d2w, 50), 2), "load": load()}


async def case_dispatch(api: Api, args: argparse.Namespace) -> dict[str, Any]:
    wf = f"e2e-disp-{uuid.uuid4().hex[:6]}"
    await api.publish(chain(wf))
    n = int(args.rate * args.seconds)
    ids: list[str] = []
    t0 = time.perf_counter()
    starts = []
    for i in range(n):
        delay = t0 + i / args.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        starts.append(asyncio.ensure_future(api.start(wf, {"x": i})))
    ids = list(await asyncio.gather(*starts))
    deadline = time.monotonic() + args.timeout
    lat: list[float] = []
    for eid in ids:
        await api.wait(eid, deadline, every=0.05)
        lat += dispatch_latencies(await api.history(eid))
    return {"case": "dispatch", "executions": n, "rate": args.rate, "hops": len(lat),
            "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2), "load": load()}


async def _start_many(api: Api, wf: str, n: int, in_flight: int, input_of: Any = lambda i: {"x": i}) -> list[str]:
    """`POST /v1/executions` n times, `in_flight` keep-alive connections at once. The lanes use the
    bare HTTP/1.1 client of bench/common.py: httpx costs more CPU per request than the gateway
    spends on it, and on two cores the load generator's CPU is taken from the stack it measures."""
    ids: list[str] = [""] * n
    it = iter(range(n))
    hostport = api.url.split("://", 1)[1].rstrip("/")
    host, _, port = hostport.rpartition(":")

    async def lane() -> None:
        conn = Http1(host, int(port))
        try:
            for i in it:
                body = json.dumps({"workflow": wf, "input": input_of(i)}).encode()
                key = uuid.uuid4().hex  # with a key, a start whose connection broke can be sent again
                for attempt in range(3):
                    try:
                        status, answer = await conn.post("/v1/executions", body, {"idempotency-key": key})
                        break
                    except (OSError, asyncio.IncompleteReadError):
                        if attempt == 2:
                            raise
                        api.retried += 1
                        conn.close()
                        conn = Http1(host, int(port))
                assert status in (200, 201), (status, answer[:200])
                ids[i] = json.loads(answer)["execution_id"]
        finally:
            conn.close()

    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return ids


async def _until_count(api: Api, wf: str, n: int, deadline: float, status: str = "completed") -> None:
    while await api.count(wf, status) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{wf}: fewer than {n} {status} after the timeout")
        await asyncio.sleep(0.05)


async def case_throughput(api: Api, args: argparse.Namespace) -> dict[str, Any]:
    wf = f"e2e-tp-{uuid.uuid4().hex[:6]}"
    await api.publish(chain(wf))
    t0 = time.perf_counter()
    await _start_many(api, wf, args.executions, args.in_flight)
    submitted = time.perf_counter() - t0
    await _until_count(api, wf, args.executions, time.monotonic() + args.timeout)
    total = time.perf_counter() - t0
    return {"case": "throughput", "executions": args.executions, "in_flight": args.in_flight,
            "submit_s": round(submitted, 2), "total_s": round(total, 2),
            "starts_per_s": round(args.executions / submitted, 1),
            "steps_per_s": round(args.executions * 5 / total, 1), "load": load()}


async def _run_one(api: Api, wf: str, input: Any, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    doc = await api.wait(await api.start(wf, input), time.monotonic() + args.timeout, every=0.25)
    return doc, time.perf_counter() - t0


async def case_map(api: Api, args: argparse.Namespace) -> dict[str, Any]:
    """A map over `--items`, and over a twentieth of them first: the big one's steps/s against the small one's."""
    wf = f"e2e-map-{uuid.uuid4().hex[:6]}"
    await api.publish(mapped(wf))
    small_items = max(100, args.items // 20)
    doc, small = await _run_one(api, wf, {"n": small_items, "x": 0}, args)
    assert doc["status"] == "completed", doc["status"]
    doc, seconds = await _run_one(api, wf, {"n": args.items, "x": 0}, args)
    assert doc["status"] == "completed", doc["status"]
    small_rate = (small_items + 1) / small
    rate = (args.items + 1) / seconds
    return {"case": "map", "items": args.items, "seconds": round(seconds, 2), "steps_per_s": round(rate, 1),
            "small_items": small_items, "small_steps_per_s": round(small_rate, 1),
            "relative_rate": round(rate / small_rate, 2), "load": load()}


async def case_history(api: Api, args: argparse.Namespace) -> dict[str, Any]:
    """A 5-step tail run after a map of history/2 items (two events per item): the tail's
    dispatch latency (its per-step cost) against the same chain in a fresh execution."""
    wf = f"e2e-hist-{uuid.uuid4().hex[:6]}"
    await api.publish(mapped(wf, tail=5))
    doc, seconds = await _run_one(api, wf, {"n": args.history // 2, "x": 0}, args)
    assert doc["status"] == "completed", doc["status"]
    hist = await api.history(doc["execution_id"])
    ran = [e for e in hist if e["type"] == "StepSucceeded" and e.get("finished_at")]  # not the map's gather
    tail = [e for e in ran if e["step_id"].startswith("t")]
    # From the tail's first step starting to its last finishing: the map's gather (one decision
    # over all its outputs, once) is not in it, the same as the small chain's span below.
    span = (_t(tail[-1]["finished_at"]) - _t(tail[0]["started_at"])).total_seconds()
    small = f"e2e-hsmall-{uuid.uuid4().hex[:6]}"
    await api.publish(chain(small))
    ref, _ = await _run_one(api, small, {"x": 0}, args)
    rh = await api.history(ref["execution_id"])
    first = min(_t(e["started_at"]) for e in rh if e["type"] == "StepSucceeded" and e.get("started_at"))
    last = max(_t(e["finished_at"]) for e in rh if e["type"] == "StepSucceeded" and e.get("finished_at"))
    ref_span = (last - first).total_seconds()
    return {"case": "history", "events_before_tail": len(hist) - len(tail) * 2, "tail_steps": len(tail),
            "tail_ms_per_step": round(span * 1000 / len(tail), 2),
            "small_ms_per_step": round(ref_span * 1000 / 5, 2),
            "relative_rate": round(ref_span / span, 2) if span else None, "load": load()}


def _cli(stack: dict[str, Any], *argv: str) -> float:
    """Seconds one `weft` command takes (the whole process, as a user sees it)."""
    env = {**os.environ, **stack.get("env", {}), "WEFT_HOME": stack["home"]}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "weft", *argv, "--json"], env=env, check=True, capture_output=True,
                   timeout=300, cwd=stack.get("cwd"))
    return time.perf_counter() - t0


async def _scale_point(api: Api, stack: dict[str, Any], wf: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    ids = await _start_many(api, wf, args.scale_probe, args.in_flight, lambda i: {"x": i})
    starts = args.scale_probe / (time.perf_counter() - t0)
    status = statistics.median(_cli(stack, "status", ids[i]) for i in range(5))
    listing = statistics.median(_cli(stack, "executions", "list", "--workflow", wf) for _ in range(5))
    return {"starts_per_s": round(starts, 1), "status_s": round(status, 3), "list_s": round(listing, 3),
            "load": load()}


async def case_scale(api: Api, stack: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    wf = f"e2e-scale-{uuid.uuid4().hex[:6]}"
    await api.publish(f"name: {wf}\nsteps:\n  - {{id: a, type: noop}}\n")
    await _start_many(api, wf, 1000 - args.scale_probe, args.in_flight)
    small = await _scale_point(api, stack, wf, args)
    t0 = time.perf_counter()
    await _start_many(api, wf, args.scale - 1000 - args.scale_probe, max(args.in_flight, 64))
    fill = time.perf_counter() - t0
    await _until_count(api, wf, args.scale - args.scale_probe, time.monotonic() + args.timeout)
    big = await _scale_point(api, stack, wf, args)
    return {"case": "scale", "small": 1000, "big": args.scale, "at_small": small, "at_big": big,
            "fill_s": round(fill, 1),
            "starts_ratio": round(big["starts_per_s"] / small["starts_per_s"], 2),
            "status_ratio": round(big["status_s"] / small["status_s"], 2),
            "list_ratio": round(big["list_s"] / small["list_s"], 2), "load": load()}


def rss_parts(pid: int) -> dict[str, float]:
    """RSS (MiB) of `pid` ("up") and of each kind of process below it ("nats", "workers")."""
    parts: dict[str, float] = {}
    todo = [(pid, "up")]
    while todo:
        p, name = todo.pop()
        try:
            rss = next(int(line.split()[1]) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
            parts[name] = round(parts.get(name, 0.0) + rss / 1024, 1)
            for t in Path(f"/proc/{p}/task").iterdir():
                for c in (t / "children").read_text().split():
                    cmd = Path(f"/proc/{c}/cmdline").read_bytes()
                    todo.append((int(c), "nats" if b"nats-server" in cmd else "workers"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return parts


def rss_mb(pid: int) -> float:
    """RSS of `pid` and every process below it (MiB)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for t in Path(f"/proc/{p}/task").iterdir():
                children = (t / "children").read_text().split()
                todo += [int(c) for c in children]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return round(total / 1024, 1)


async def case_memory(api: Api, stack: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """RSS of `weft up` and its children with `--memory-executions` in flight, and after they are
    done, for two rounds: what the second round leaves beyond the first is what is kept per execution."""
    pid = stack["pid"]
    wf = f"e2e-mem-{uuid.uuid4().hex[:6]}"
    await api.publish(napping(wf))
    out: dict[str, Any] = {"case": "memory", "in_flight": args.memory_executions, "rss_idle_mb": rss_mb(pid)}
    for round_ in range(1, args.memory_rounds + 1):
        await _start_many(api, wf, args.memory_executions, args.in_flight, lambda i: {"s": args.nap})
        out[f"round{round_}_rss_in_flight_mb"] = rss_mb(pid)
        await _until_count(api, wf, args.memory_executions * round_, time.monotonic() + args.timeout)
        out[f"round{round_}_rss_done_mb"] = rss_mb(pid)
        out[f"round{round_}_done_parts_mb"] = rss_parts(pid)
    out["load"] = load()
    return out


CASES = ("throughput", "latency", "dispatch", "map", "history", "scale", "memory")


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    with weft_up(args) as stack:
        api = Api(stack["gateway_url"], timeout=args.timeout)
        try:
            for case in args.cases.split(","):
                t0 = time.perf_counter()
                if case in ("scale", "memory"):
                    r = await globals()[f"case_{case}"](api, stack, args)
                else:
                    r = await globals()[f"case_{case}"](api, args)
                r["wall_s"] = round(time.perf_counter() - t0, 1)
                print(_row(r), file=sys.stderr, flush=True)
                out.append(r)
        finally:
            await api.http.aclose()
    return out


def _row(r: dict[str, Any]) -> str:
    rest = " · ".join(f"{k} {v}" for k, v in r.items() if k not in ("case", "load"))
    return f"{r['case']:>10}: {rest}  [load {r['load']}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="sqlite", help="'sqlite' or a postgresql:// URL (a fresh schema in it)")
    p.add_argument("--home", help="attach to the `weft up` running in this home instead of starting one "
                                  "(its worker must allow module e2e_steps)")
    p.add_argument("--cases", default="throughput,latency,dispatch,map,history,memory",
                   help=f"comma-separated, of {', '.join(CASES)} (scale is long: not in the default)")
    p.add_argument("--workers", type=int, default=None, help="`weft up --workers N` (default: its own)")
    p.add_argument("--concurrency", type=int, default=None, help="`weft up --concurrency N`")
    p.add_argument("--env", nargs=2, action="append", metavar=("NAME", "VALUE"), help="extra environment for weft up")
    p.add_argument("--executions", type=int, default=1000)
    p.add_argument("--in-flight", type=int, default=32)
    p.add_argument("--sequential", type=int, default=25)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--history", type=int, default=10_000)
    p.add_argument("--scale", type=int, default=100_000)
    p.add_argument("--scale-probe", type=int, default=300, help="starts timed at each scale point")
    p.add_argument("--memory-executions", type=int, default=5000)
    p.add_argument("--memory-rounds", type=int, default=2)
    p.add_argument("--nap", type=float, default=0.02, help="seconds each memory-case step sleeps")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the temporary home (its up.log)")
    args = p.parse_args()
    for case in args.cases.split(","):
        if case not in CASES:
            p.error(f"--cases: unknown case {case!r} (known: {', '.join(CASES)})")
    results = asyncio.run(run(args))
    backend = "sqlite" if args.db == "sqlite" else "postgresql"
    print(f"weft e2e [{backend}] · load average {load()}")
    for r in results:
        print(_row(r))
    print(json.dumps({"benchmark": "weft-e2e", "backend": backend, "results": results}))


if __name__ == "__main__":
    main()
