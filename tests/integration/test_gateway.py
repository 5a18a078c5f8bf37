"""The HTTP gateway over a real stack (NATS, database, relay, orchestrator, worker, projector,
trigger consumer): workflows, executions and their control, history, live events, triggers,
and the error model."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import orjson
import pytest

from services.gateway.app import create_app
from services.settings import read_stack
from tests.support import Running, stack_up, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
PARTS = ("orchestrator", "relay", "worker", "projector", "triggers", "gateway")

ECHO = """
name: echo
on: [{event: echo.requested}]
input_schema: {type: object, required: [msg], properties: {msg: {type: string}}}
steps:
  - {id: say, type: transform, with: {expression: "msg"}, input: {msg: "${{ input.msg }}"}}
output: "${{ steps.say.output }}"
"""
SLOW = """
name: slow
steps:
  - {id: a, type: sleep, with: {seconds: 0.6}}
  - {id: b, type: noop, needs: [a]}
"""
FLAKY = """
name: flaky
steps:
  - {id: first, type: transform, with: {expression: "flag"}, input: {flag: "${{ input.flag }}"}}
  - id: second
    type: python
    needs: [first]
    with: {callable: "tests.integration.test_gateway:needs_flag"}
    input: {flag: "${{ steps.first.output }}"}
    retry: {max_attempts: 1}
"""


def needs_flag(input: dict[str, Any], ctx: Any) -> str:
    """Fails until the file named by `flag` exists (a fix made between a failure and a retry)."""
    if not Path(input["flag"]).exists():
        raise RuntimeError("not yet")
    return "fixed"


class Api:
    def __init__(self, running: Running, client: httpx.AsyncClient):
        self.running, self.client = running, client
        self.store = running.stack.store

    async def publish(self, text: str) -> dict[str, Any]:
        r = await self.client.post("/v1/workflows", content=text, headers={"content-type": "application/yaml"})
        assert r.status_code in (200, 201), r.text
        return r.json()

    async def start(self, workflow: str, data: Any, **headers: str) -> httpx.Response:
        return await self.client.post("/v1/executions", json={"workflow": workflow, "input": data}, headers=headers)

    async def finished(self, eid: str, timeout: float = 20) -> dict[str, Any]:
        async def done() -> Any:
            body = (await self.client.get(f"/v1/executions/{eid}")).json()
            return body if body["status"] in ("completed", "failed", "cancelled") else None

        return await wait_until(done, timeout=timeout, what=f"{eid} to finish")


async def _admin_client(running: Running) -> httpx.AsyncClient:
    from services.gateway.keys import Keys

    token, _ = await asyncio.to_thread(Keys(running.stack.store).create, ["admin"])
    return httpx.AsyncClient(base_url=running.stack.gateway.url, headers={"Authorization": f"Bearer {token}"},
                             timeout=30)


@pytest.fixture
async def api(tmp_path: Path, pg_url: str, nats_url: str) -> AsyncIterator[Api]:
    async with stack_up(tmp_path, pg_url, nats_url, parts=PARTS) as running, await _admin_client(running) as client:
        yield Api(running, client)


async def test_workflows_publish_list_get_and_versions(api: Api) -> None:
    c = api.client
    first = await c.post("/v1/workflows", content=ECHO, headers={"content-type": "application/yaml"})
    assert first.status_code == 201 and first.json()["created"] is True and first.json()["id"] == "echo@1"
    again = await c.post("/v1/workflows", content=ECHO, headers={"content-type": "application/yaml"})
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["content_hash"] == first.json()["content_hash"]
    v2 = await c.post("/v1/workflows", json={"name": "echo", "steps": [{"id": "a", "type": "noop"}]})
    assert v2.status_code == 201 and v2.json()["version"] == 2
    listed = (await c.get("/v1/workflows")).json()["items"]
    assert [(w["workflow"], w["version"]) for w in listed] == [("echo", 2)]
    assert (await c.get("/v1/workflows/echo")).json()["definition"]["steps"] == [{"id": "a", "type": "noop"}]
    assert [v["version"] for v in (await c.get("/v1/workflows/echo/versions")).json()["items"]] == [1, 2]
    assert (await c.get("/v1/workflows/echo/versions/1")).json()["definition"]["name"] == "echo"
    assert (await c.get("/v1/workflows/echo/versions/3")).status_code == 404
    assert (await c.get("/v1/workflows/nope")).status_code == 404


async def test_an_invalid_definition_is_422_naming_the_field_and_line(api: Api) -> None:
    bad = "name: broken\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, needs: [zzz]}\n"
    r = await api.client.post("/v1/workflows", content=bad, headers={"content-type": "application/yaml"})
    assert r.status_code == 422
    [problem] = r.json()["error"]["problems"]
    assert problem["field"] == "body.steps[1].needs[0]" and problem["line"] == 4 and "zzz" in problem["message"]
    cron = "name: c\non: [{cron: 'every tuesday'}]\nsteps: [{id: a, type: noop}]\n"
    r = await api.client.post("/v1/workflows", content=cron, headers={"content-type": "application/yaml"})
    assert r.status_code == 422 and r.json()["error"]["problems"][0]["field"] == "body.on[0].cron"
    assert r.json()["error"]["problems"][0]["line"] == 2
    assert (await api.client.get("/v1/workflows")).json()["items"] == []  # nothing half-stored


async def test_start_with_an_idempotency_key_get_and_input_errors(api: Api) -> None:
    await api.publish(ECHO)
    r1 = await api.start("echo", {"msg": "hi"}, **{"Idempotency-Key": "order-7"})
    assert r1.status_code == 201 and r1.json()["created"] is True
    r2 = await api.start("echo", {"msg": "hi"}, **{"Idempotency-Key": "order-7"})
    assert r2.status_code == 200 and r2.json()["id"] == r1.json()["id"] and r2.json()["created"] is False
    r3 = await api.start("echo", {"msg": "other"}, **{"Idempotency-Key": "order-7"})
    assert r3.status_code == 409 and r3.json()["error"]["code"] == "idempotency_conflict"
    done = await api.finished(r1.json()["id"])
    assert done["output"] == "hi" and done["version"] == 1 and done["steps"][0]["status"] == "succeeded"
    bad = await api.start("echo", {"msg": 3})
    assert bad.status_code == 422 and bad.json()["error"]["problems"][0]["field"] == "body.input.msg"
    missing = await api.client.post("/v1/executions", json={"input": {}})
    assert missing.status_code == 422 and missing.json()["error"]["problems"][0]["field"] == "body.workflow"
    assert (await api.start("nope", {})).status_code == 404
    assert (await api.client.get(f"/v1/executions/{uuid.uuid4()}")).status_code == 404
    assert (await api.client.get("/v1/executions/not-a-uuid")).status_code == 404
    as_form = await api.client.post("/v1/executions", content=b"workflow=echo",
                                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert as_form.status_code == 422 and "application/json" in as_form.json()["error"]["message"]


async def test_list_filters_and_pagination(api: Api) -> None:
    await api.publish(ECHO)
    await api.publish(SLOW)
    ids = [(await api.start("echo", {"msg": str(n)})).json()["id"] for n in range(5)]
    slow = (await api.start("slow", {})).json()["id"]
    for eid in ids:
        await api.finished(eid)

    async def listed(**params: Any) -> list[dict[str, Any]]:
        return (await api.client.get("/v1/executions", params=params)).json()["items"]

    await wait_until(lambda: _count(listed(workflow="echo", status="completed"), 5), timeout=10)
    pages, cursor = [], None
    while True:
        params = {"workflow": "echo", "limit": 2, **({"cursor": cursor} if cursor else {})}
        body = (await api.client.get("/v1/executions", params=params)).json()
        pages.append([r["id"] for r in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(sum(pages, [])) == sorted(ids)  # every one once, no overlap
    everything = await listed(limit=50)
    assert everything[0]["started_at"] >= everything[-1]["started_at"]  # newest first
    assert slow in {r["id"] for r in everything}
    middle = everything[len(everything) // 2]["started_at"]
    assert all(r["started_at"] >= middle for r in await listed(since=middle))
    assert all(r["started_at"] < middle for r in await listed(until=middle))
    bad = await api.client.get("/v1/executions", params={"status": "sleeping"})
    assert bad.status_code == 422 and bad.json()["error"]["problems"][0]["field"] == "query.status"
    assert (await api.client.get("/v1/executions", params={"cursor": "!!"})).status_code == 422


async def _count(rows: Any, n: int) -> bool:
    return len(await rows) >= n


async def test_pause_resume_cancel(api: Api) -> None:
    await api.publish(SLOW)
    eid = (await api.start("slow", {})).json()["id"]
    paused = await api.client.post(f"/v1/executions/{eid}/pause", json={"why": "looking"})
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert paused.json()["applied"] == ["ExecutionPaused"]
    await asyncio.sleep(1.2)  # a finishes while paused; b is not scheduled
    state = (await api.client.get(f"/v1/executions/{eid}")).json()
    assert state["status"] == "paused" and [s["status"] for s in state["steps"]] == ["succeeded", "pending"]
    assert (await api.client.post(f"/v1/executions/{eid}/resume")).json()["status"] == "running"
    assert (await api.finished(eid))["status"] == "completed"
    again = await api.client.post(f"/v1/executions/{eid}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "finished"

    other = (await api.start("slow", {})).json()["id"]
    cancelled = await api.client.post(f"/v1/executions/{other}/cancel", json={"why": "no longer needed"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    async def ignored() -> bool:
        items = (await api.client.get(f"/v1/executions/{other}/history")).json()["items"]
        return any(e["type"] == "StepResultIgnored" for e in items)

    await wait_until(ignored, timeout=10, what="the late result to be recorded as ignored")
    items = (await api.client.get(f"/v1/executions/{other}/history")).json()["items"]
    cancel = next(e for e in items if e["type"] == "ExecutionCancelled")
    assert cancel["why"] == "no longer needed" and cancel["by"].startswith("key:")
    assert (await api.client.post(f"/v1/executions/{uuid.uuid4()}/pause")).status_code == 404


async def test_retry_runs_the_failed_steps_again_and_keeps_the_rest(api: Api, tmp_path: Path) -> None:
    await api.publish(FLAKY)
    flag = tmp_path / "fixed.flag"
    eid = (await api.start("flaky", {"flag": str(flag)})).json()["id"]
    failed = await api.finished(eid)
    assert failed["status"] == "failed" and failed["error"]["step_id"] == "second"
    assert (await api.client.post(f"/v1/executions/{eid}/resume")).status_code == 409
    flag.touch()
    retried = await api.client.post(f"/v1/executions/{eid}/retry")
    assert retried.status_code == 200 and retried.json()["applied"][0] == "ExecutionRetried"
    done = await api.finished(eid)
    assert done["status"] == "completed"
    items = (await api.client.get(f"/v1/executions/{eid}/history")).json()["items"]
    scheduled = [e["step_id"] for e in items if e["type"] == "StepScheduled"]
    assert scheduled.count("first") == 1 and scheduled.count("second") == 2
    assert [e["seq"] for e in items] == list(range(1, len(items) + 1))
    page = (await api.client.get(f"/v1/executions/{eid}/history", params={"after": 2, "limit": 2})).json()["items"]
    assert [e["seq"] for e in page] == [3, 4]


async def test_live_events_over_sse_until_finished(api: Api) -> None:
    await api.publish(SLOW)
    eid = (await api.start("slow", {})).json()["id"]
    got: list[tuple[str, str, dict[str, Any]]] = []
    async with api.client.stream("GET", f"/v1/executions/{eid}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        block: dict[str, str] = {}
        async for line in r.aiter_lines():
            if line:
                name, _, value = line.partition(": ")
                block[name] = value
                continue
            got.append((block.get("id", ""), block["event"], orjson.loads(block["data"])))
            block = {}
    kinds = [k for _, k, _ in got]
    assert kinds[0] == "ExecutionStarted" and kinds[-2:] == ["ExecutionCompleted", "end"]
    assert [int(i) for i, _, _ in got[:-1]] == list(range(1, len(got)))
    # resuming after a seen event gives only the rest
    async with api.client.stream("GET", f"/v1/executions/{eid}/events", headers={"Last-Event-ID": "3"}) as r:
        text = (await r.aread()).decode()
    assert "id: 3\n" not in text and "id: 4\n" in text and text.endswith("event: end\ndata: {}\n\n")
    assert (await api.client.get(f"/v1/executions/{uuid.uuid4()}/events")).status_code == 404


async def test_publish_a_trigger_over_http(api: Api) -> None:
    await api.publish(ECHO)
    body = {"type": "echo.requested", "source": "tests", "id": "http-1", "data": {"msg": "from http"}}
    r = await api.client.post("/v1/triggers", json=body)
    assert r.status_code == 202 and r.json() == {
        "id": "http-1", "source": "tests", "type": "echo.requested", "topic": "weft.triggers.echo.requested",
        "duplicate": False}
    assert (await api.client.post("/v1/triggers", json=body)).json()["duplicate"] is True
    generated = (await api.client.post("/v1/triggers", json={"type": "echo.requested", "data": {"msg": "x"}})).json()
    assert uuid.UUID(generated["id"]) and generated["source"] == "weft:api"
    assert (await api.client.post("/v1/triggers", json={"data": {}})).json()["error"]["problems"][0]["field"] == "body.type"

    async def two() -> Any:
        rows = (await api.client.get("/v1/executions", params={"workflow": "echo"})).json()["items"]
        return rows if len(rows) >= 2 else None

    rows = await wait_until(two, timeout=15)
    assert len(rows) == 2


async def test_limits_health_and_openapi(api: Api) -> None:
    # Bodies that carry no payload keep the small limit (payload bodies: tests/integration/test_payloads.py).
    big = await api.client.post("/v1/workflows", content=b"x" * (1024 * 1024 + 1),
                                headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 65536 * 2

    streamed = await api.client.post("/v1/workflows", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    ready = (await api.client.get("/readyz")).json()
    assert ready == {"status": "ready", "store": "ok", "broker": "ok"}
    doc = (await api.client.get("/v1/openapi.json")).json()
    assert "/v1/executions/{execution_id}/events" in doc["paths"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert (await api.client.patch("/v1/executions")).status_code == 405


async def test_a_server_error_answers_an_error_id_and_never_a_traceback(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    # The real app with one more route that fails, called in process.
    ctx = api.running.stack.gateway.app.state.ctx
    app = create_app(ctx)

    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("secret detail: password=hunter2")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="weft.gateway"):
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            r = await c.get("/v1/boom")
    assert r.status_code == 500
    body = r.json()["error"]
    assert body["code"] == "internal" and len(body["error_id"]) == 16
    assert "hunter2" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    assert any(body["error_id"] in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_weft_up_runs_the_gateway_without_auth_on_loopback_and_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    env.update(WEFT_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "weft", "up"], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not read_stack(tmp_path).get("gateway_url"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url = read_stack(tmp_path)["gateway_url"]
        assert url.startswith("http://127.0.0.1:")
        r = httpx.get(f"{url}/v1/workflows", timeout=10)
        assert r.status_code == 200  # no key needed
        text = log.read_text()
        assert "auth is off" in text and "loopback" in text and f"{url}/v1" in text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    refused = subprocess.run([sys.executable, "-m", "weft", "gateway", "--no-auth", "--host", "0.0.0.0"], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "loopback" in refused.stderr


async def test_replay_bulk_replay_and_backfill_over_http(api: Api) -> None:
    await api.publish(ECHO)
    first = (await api.start("echo", {"msg": "hi"})).json()["id"]
    await api.finished(first)
    c = api.client
    dry = await c.post(f"/v1/executions/{first}/replay", json={"dry_run": True})
    assert dry.status_code == 201 and dry.json()["dry_run"] is True
    r = await c.post(f"/v1/executions/{first}/replay", json={"input_patch": {"msg": "again"}},
                     headers={"Idempotency-Key": "rp-1"})
    assert r.status_code == 201, r.text
    replay_id = r.json()["execution_id"]
    done = await api.finished(replay_id)
    assert done["output"] == "again" and done["replay_of"] == first
    same = await c.post(f"/v1/executions/{first}/replay", json={"input_patch": {"msg": "again"}},
                        headers={"Idempotency-Key": "rp-1"})
    assert same.json()["execution_id"] == replay_id  # the same key replays once
    bad = await c.post(f"/v1/executions/{first}/replay", json={"input_patch": {"msg": 3}})
    assert bad.status_code == 422
    assert (await c.post(f"/v1/executions/{first}/replay", json={"from_step": "nope"})).status_code == 422
    assert (await c.post(f"/v1/executions/{uuid.uuid4()}/replay", json={})).status_code == 404

    bulk = await c.post("/v1/replays", json={"filter": {"workflow": "echo", "status": "completed"}, "dry_run": True})
    assert bulk.status_code == 200, bulk.text
    assert (await c.post("/v1/replays", json={"filter": {"colour": "blue"}})).status_code == 422
    # Issue 16 part 2 item 4: `filter` is an object, as the dead-letter routes take it; a string is refused
    # naming the field, and workflow NAME@VERSION selects that version.
    text = await c.post("/v1/replays", json={"filter": "workflow=echo", "dry_run": True})
    assert text.status_code == 422 and "body.filter" in text.text, text.text
    at = await c.post("/v1/replays", json={"filter": {"workflow": "echo@1", "status": "completed"}, "dry_run": True})
    assert at.status_code == 200 and at.json()["filter"] == "status=completed,version=1,workflow=echo", at.text

    window = {"workflow": "echo", "from": "2020-01-01T00:00:00Z", "to": "2020-01-02T00:00:00Z", "dry_run": True}
    fill = await c.post("/v1/backfills", json=window)
    assert fill.status_code == 200, fill.text
    assert (await c.post("/v1/backfills", json={**window, "workflow": "ghost"})).status_code == 422
