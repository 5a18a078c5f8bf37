"""One trace per execution across processes, and /metrics /healthz /readyz on a standalone service
(issue 15, parts 1 and 2).

The gateway, the orchestrator, the relay and the worker run as separate processes
(`python -m weft <service>`) over a real NATS and PostgreSQL, exporting with the
OpenTelemetry SDK's OTLP/HTTP exporter, configured only by the standard OTEL_*
variables, to a receiver in this test that decodes the protobuf requests. An
execution started over HTTP with a `traceparent` must come back as one trace with
spans from all four processes, joined to the caller's span.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from contracts.definitions import parse_definition
from services.orchestrator.executions import Executions
from services.orchestrator.registry import Registry
from services.store import open_store
from tests.support import Services, service_env, wait_until

pytestmark = pytest.mark.integration

FLOW = """
name: traced
steps:
  - id: charge
    type: python
    with: {callable: "tests.integration.steps:flaky"}
    input: {order: "${{ input.order }}", flag: "${{ input.flag }}", log: "${{ input.log }}"}
    retry: {max_attempts: 3, initial_delay: 0.05, max_delay: 0.1}
  - id: notify
    type: http
    needs: [charge]
    with: {method: GET, url: "${{ input.url }}"}
output: "${{ steps.charge.output }}"
"""


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (POST /v1/traces, protobuf), plus GET /ok for the http step."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/v1/traces":
                    receiver.add(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                with receiver.lock:
                    receiver.spans.append({"name": "GET /ok (server)", "traceparent": self.headers.get("traceparent"),
                                           "service": "receiver", "trace_id": "", "span_id": "", "parent": ""})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "11")
                self.end_headers()
                self.wfile.write(b'{"ok":true}')

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        out = []
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append({
                        "service": service, "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(), "attributes": {a.key: _value(a.value) for a in s.attributes},
                        "events": [e.name for e in s.events], "status": s.status.code, "kind": s.kind,
                        "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                    })
        with self.lock:
            self.spans.extend(out)

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def waterfall(spans: list[dict[str, Any]], root: str) -> str:
    """The spans of a trace as an indented tree, children in start order, with durations."""
    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        children.setdefault(s["parent"], []).append(s)
    t0 = min(s["start"] for s in spans)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x["start"]):
            events = f"  [{', '.join(s['events'])}]" if s["events"] else ""
            lines.append(f"{(s['start'] - t0) / 1e6:8.1f} ms {(s['end'] - s['start']) / 1e6:7.1f} ms  "
                         f"{s['service']:5} {'  ' * depth}{s['name']}{events}")
            walk(s["span_id"], depth + 1)

    walk(root, 0)
    return "\n".join(lines) + "\n"


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_one_execution_started_over_http_is_one_trace_across_the_processes(
    tmp_path: Path, pg_url: str, nats_url: str, receiver: Receiver
) -> None:
    store = open_store(pg_url)
    Registry(store).publish(parse_definition(FLOW))
    gateway_port, worker_metrics = _free_port(), _free_port()
    env = service_env(tmp_path, pg_url, nats_url, prefix="o")
    env.update({
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_BSP_SCHEDULE_DELAY": "100",
        "WEFT_GATEWAY_PORT": str(gateway_port), "WEFT_HTTP_ALLOWED_HOSTS": f"127.0.0.1:{receiver.port}",
        "WEFT_LOG_FORMAT": "json", "WEFT_GATEWAY_AUTH": "false",
    })
    svc = Services(env, tmp_path / "logs")
    try:
        svc.start("gateway", OTEL_SERVICE_NAME="gw")
        svc.start("orchestrator", OTEL_SERVICE_NAME="orch")
        svc.start("relay", OTEL_SERVICE_NAME="rel")
        svc.start("worker", OTEL_SERVICE_NAME="wrk", WEFT_METRICS_PORT=str(worker_metrics))
        base = f"http://127.0.0.1:{gateway_port}"
        async with httpx.AsyncClient(timeout=10) as client:
            async def up(url: str) -> bool:
                try:
                    return (await client.get(url)).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(lambda: up(f"{base}/readyz"), timeout=60, what="the gateway")
            await wait_until(lambda: up(f"http://127.0.0.1:{worker_metrics}/readyz"), timeout=60, what="the worker")
            caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
            flag = tmp_path / "flag"
            body = {"workflow": "traced", "input": {
                "order": "o-1", "flag": str(flag), "log": str(tmp_path / "runs.log"),
                "url": f"http://127.0.0.1:{receiver.port}/ok"}}
            r = await client.post(f"{base}/v1/executions", json=body,
                                  headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"})
            assert r.status_code == 201, r.text
            execution_id = r.json()["id"]
            executions = Executions(store)
            # The first attempt fails; the retry runs once the flag is there.
            await wait_until(lambda: (tmp_path / "runs.log").exists(), timeout=30, what="the first attempt")
            flag.write_text("go")

            async def completed() -> bool:
                s = await asyncio.to_thread(executions.load, execution_id, fresh=True)
                return s.status == "completed"

            await wait_until(completed, timeout=60, what="the execution to complete")

            # The execution records the caller's trace; every hop's spans are in it.
            started = (await asyncio.to_thread(executions.history, execution_id))[0]
            assert started.trace_id and started.trace_id.split("-")[1] == caller_trace

            def whole() -> list[dict[str, Any]] | None:
                spans = receiver.trace(caller_trace)
                services = {s["service"] for s in spans}
                names = [s["name"] for s in spans]
                # Each process exports in batches of its own: wait for every span asserted on below.
                steps = {(s["attributes"].get("weft.step_id"), s["attributes"].get("weft.attempt")) for s in spans
                         if s["service"] == "wrk" and s["name"].startswith("step ")}
                if ({"gw", "orch", "rel", "wrk"} <= services and sum(n.startswith("decide") for n in names) >= 3
                        and {("charge", 1), ("charge", 2)} <= steps and any(sid == "notify" for sid, _ in steps)):
                    return spans
                return None

            spans = await wait_until(whole, timeout=30, what="spans from all four processes")
            by_id = {s["span_id"]: s for s in spans}
            # Joined to the caller's span: the gateway's server span is its child.
            server = [s for s in spans if s["service"] == "gw" and s["parent"] == caller_span]
            assert server, [(s["service"], s["name"], s["parent"]) for s in spans]
            steps = [s for s in spans if s["service"] == "wrk" and s["name"].startswith("step ")]
            charge = [s for s in steps if s["attributes"]["weft.step_id"] == "charge"]
            assert sorted(s["attributes"]["weft.attempt"] for s in charge) == [1, 2]
            for s in charge:
                a = s["attributes"]
                assert a["weft.execution_id"] == execution_id and a["weft.workflow"] == "traced"
                assert a["weft.workflow.version"] == "1" and a["weft.step_type"] == "python"
                # A worker span's parent is the relay's publish span of that command.
                assert by_id[s["parent"]]["service"] == "rel"
            failed = next(s for s in charge if s["attributes"]["weft.attempt"] == 1)
            assert failed["attributes"]["weft.outcome"] == "failed" and "exception" in failed["events"]
            assert failed["status"] == 2  # STATUS_CODE_ERROR
            # The orchestrator's decision on the failed attempt: a child of that attempt's span, with the retry.
            decided = [s for s in spans if s["service"] == "orch" and s["parent"] == failed["span_id"]]
            assert decided and "retry scheduled" in decided[0]["events"]
            # The http step's outgoing call: an httpx client span under the step's span, and the
            # traceparent went to the server it called.
            notify = next(s for s in steps if s["attributes"]["weft.step_id"] == "notify")
            client_spans = [s for s in spans if s["parent"] == notify["span_id"] and s["kind"] == 3]  # CLIENT
            assert client_spans, [(s["name"], s["kind"]) for s in spans if s["service"] == "wrk"]
            got = [s for s in receiver.spans if s["service"] == "receiver"]
            assert got and got[-1]["traceparent"].split("-")[1] == caller_trace

            out = os.environ.get("WEFT_TRACE_WATERFALL")  # for the README: the trace as text
            if out:
                Path(out).write_text(waterfall(receiver.trace(caller_trace), caller_span))

            # The standalone worker serves /metrics, /healthz and /readyz on WEFT_METRICS_PORT.
            text = (await client.get(f"http://127.0.0.1:{worker_metrics}/metrics")).text
            assert 'weft_step_attempts_total{outcome="failed",step_type="python"} 1.0' in text
            assert 'weft_step_attempts_total{outcome="succeeded",step_type="python"} 1.0' in text
            assert 'weft_step_duration_seconds_count{step_type="http"} 1.0' in text
            assert "weft_step_dispatch_latency_seconds_bucket" in text
            assert (await client.get(f"http://127.0.0.1:{worker_metrics}/healthz")).json() == {"status": "ok"}
            ready = (await client.get(f"http://127.0.0.1:{worker_metrics}/readyz")).json()
            assert ready["status"] == "ready" and ready["store"] == "ok" and ready["broker"] == "ok"
    finally:
        svc.stop_all()
        store.close()
    # WEFT_LOG_FORMAT=json: each line a JSON object (the services logged their start at least)
    import orjson

    lines = [ln for f in (tmp_path / "logs").iterdir() for ln in f.read_text().splitlines() if ln.startswith("{")]
    assert lines and all(isinstance(orjson.loads(ln), dict) for ln in lines)


async def test_without_otel_variables_nothing_is_traced_and_no_trace_id_is_recorded(
    tmp_path: Path, pg_url: str, nats_url: str
) -> None:
    from tests.support import stack_up

    async with stack_up(tmp_path, pg_url, nats_url, parts=["orchestrator", "relay", "worker"]) as s:
        version = s.publish("name: plain\nsteps:\n  - {id: a, type: noop}\n")
        eid = await s.start(version, {})
        await s.finished(eid)
        history = await s.history(eid)
        assert history[0].trace_id is None
        assert all(getattr(e, "trace_id", None) is None for e in history)
    assert uuid.UUID(eid)


async def test_a_service_waiting_for_its_broker_is_alive_but_not_ready(tmp_path: Path, pg_url: str) -> None:
    port, nowhere = _free_port(), _free_port()  # nothing listens on `nowhere`: the broker is away
    env = service_env(tmp_path, pg_url, f"nats://127.0.0.1:{nowhere}", prefix="o")
    svc = Services(env, tmp_path / "logs")
    try:
        svc.start("orchestrator", WEFT_METRICS_PORT=str(port))
        async with httpx.AsyncClient(timeout=5) as client:
            async def health() -> httpx.Response | None:
                try:
                    return await client.get(f"http://127.0.0.1:{port}/healthz")
                except httpx.TransportError:
                    return None

            assert (await wait_until(health, timeout=30, what="/healthz")).json() == {"status": "ok"}
            r = await client.get(f"http://127.0.0.1:{port}/readyz")
            assert r.status_code == 503 and r.json() == {"status": "not ready", "service": "starting"}
            assert (await client.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200
            assert (await client.get(f"http://127.0.0.1:{port}/elsewhere")).status_code == 404
    finally:
        svc.stop_all()
    assert all(p.returncode == 0 for p in svc.procs.values()), [p.returncode for p in svc.procs.values()]
