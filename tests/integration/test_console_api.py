"""The `/v1` read endpoints the console uses, its pages and the gateway's guard, against a real stack."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import orjson
import pytest

from services.gateway.app import create_app
from services.gateway.keys import Keys
from tests.support import Running, stack_up, wait_until

pytestmark = pytest.mark.integration
PARTS = ("orchestrator", "relay", "worker", "projector", "triggers", "gateway")
TWO = """
name: two-steps
steps:
  - {id: a, type: noop}
  - {id: b, type: noop, needs: [a]}
"""
OTHER = "name: other\nsteps:\n  - {id: x, type: noop}\n"


class World:
    def __init__(self, running: Running, admin: str, bound: str):
        self.running, self.admin, self.bound = running, admin, bound
        self.url = running.stack.gateway.url

    def client(self, key: str | None = None, **headers: str) -> httpx.AsyncClient:
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)

    async def start(self, workflow: str) -> str:
        async with self.client(self.admin) as c:
            r = await c.post("/v1/executions", json={"workflow": workflow, "input": {}})
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

    async def finished(self, eid: str) -> dict[str, Any]:
        async with self.client(self.admin) as c:
            async def done() -> Any:
                body = (await c.get(f"/v1/executions/{eid}")).json()
                return body if body["status"] in ("completed", "failed", "cancelled") else None

            return await wait_until(done, timeout=30, what=f"{eid} to finish")


@pytest.fixture
async def world(tmp_path: Path, pg_url: str, nats_url: str) -> AsyncIterator[World]:
    async with stack_up(tmp_path, pg_url, nats_url, parts=PARTS) as running:
        keys = Keys(running.stack.store)
        admin, _ = await asyncio.to_thread(keys.create, ["admin"], name="ops")
        bound, _ = await asyncio.to_thread(keys.create, ["read"], workflows=["two-steps"], name="bound")
        w = World(running, admin, bound)
        async with w.client(admin) as c:
            for text in (TWO, OTHER):
                r = await c.post("/v1/workflows", content=text, headers={"content-type": "application/yaml"})
                assert r.status_code == 201, r.text
        yield w


async def test_whoami_says_scopes_and_binding(world: World) -> None:
    async with world.client(world.admin) as c:
        me = (await c.get("/v1/whoami")).json()
    assert me["auth"] is True and me["name"] == "ops" and me["scopes"] == ["admin", "read", "trigger"]
    assert me["workflows"] is None
    async with world.client(world.bound) as c:
        me = (await c.get("/v1/whoami")).json()
    assert me["scopes"] == ["read"] and me["workflows"] == ["two-steps"]
    async with world.client() as c:
        assert (await c.get("/v1/whoami")).status_code == 401


async def test_state_as_of_event_n(world: World) -> None:
    eid = await world.start("two-steps")
    done = await world.finished(eid)
    async with world.client(world.admin) as c:
        at2 = (await c.get(f"/v1/executions/{eid}/at/2")).json()
        assert at2["status"] == "running" and at2["as_of"] == 2 and at2["of"] == done["events"]
        assert {s["step_id"]: s["status"] for s in at2["steps"]}["a"] == "scheduled"
        assert [a["step_id"] for a in at2["attempts"]] == ["a"]
        last = (await c.get(f"/v1/executions/{eid}/at/{done['events']}")).json()
        assert last["status"] == "completed"
        beyond = await c.get(f"/v1/executions/{eid}/at/{done['events'] + 1}")
        assert beyond.status_code == 422 and "pick 1 to" in beyond.text
        assert (await c.get(f"/v1/executions/{uuid.uuid4()}/at/1")).status_code == 404
        assert (await c.get(f"/v1/executions/{eid}/at/0")).status_code == 422


async def test_list_by_id_prefix(world: World) -> None:
    eid = await world.start("two-steps")
    await world.finished(eid)
    async with world.client(world.admin) as c:
        async def listed() -> Any:
            items = (await c.get("/v1/executions", params={"id": eid[:6].upper()})).json()["items"]
            return items or None

        items = await wait_until(listed, timeout=10, what="the view to list it")
        assert [x["id"] for x in items] == [eid]
        bad = await c.get("/v1/executions", params={"id": "x%'"})
        assert bad.status_code == 422 and "query.id" in bad.text


async def _changes(client: httpx.AsyncClient, want: set[str], seen: list[dict[str, Any]]) -> None:
    async with client.stream("GET", "/v1/changes", params={"after": 0}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                seen.append(orjson.loads(line[6:]))
                if want <= {(c["execution_id"] + ":" + c["status"]) for c in seen}:
                    return


async def test_changes_feed_live_status_for_the_workflows_a_key_may_see(world: World) -> None:
    mine, theirs = await world.start("two-steps"), await world.start("other")
    await world.finished(mine)
    await world.finished(theirs)
    admin_seen: list[dict[str, Any]] = []
    async with world.client(world.admin) as c:
        await asyncio.wait_for(_changes(c, {f"{mine}:completed", f"{theirs}:completed"}, admin_seen), 20)
    assert {c["type"] for c in admin_seen if c["execution_id"] == mine} >= {"ExecutionStarted", "ExecutionCompleted"}
    bound_seen: list[dict[str, Any]] = []
    later = await world.start("two-steps")
    async with world.client(world.bound) as c:
        await asyncio.wait_for(_changes(c, {f"{later}:completed"}, bound_seen), 20)
    assert {c["workflow"] for c in bound_seen} == {"two-steps"}


async def test_stats_and_projections(world: World) -> None:
    eid = await world.start("two-steps")
    await world.finished(eid)
    async with world.client(world.admin) as c:
        async def counted() -> Any:
            items = (await c.get("/v1/stats/workflows", params={"workflow": "two-steps"})).json()["items"]
            return items if items and items[0]["completed"] >= 1 else None

        [row] = await wait_until(counted, timeout=10, what="stats")
        assert row["p50_ms"] is not None and row["failure_rate"] == 0
        views = (await c.get("/v1/projections")).json()["items"]
        assert {"executions", "timeline", "workflow_stats"} <= {v["name"] for v in views}
        assert all(v["lag"] == max(v["head"] - v["position"], 0) for v in views)
        started = await c.post("/v1/projections/timeline/rebuild")
        assert started.status_code == 202

        async def rebuilt() -> Any:
            body = (await c.get("/v1/projections/timeline/rebuild")).json()
            return body if not body["running"] else None

        result = await wait_until(rebuilt, timeout=20, what="the rebuild")
        assert result["error"] is None and result["result"]["name"] == "view:timeline"
        assert (await c.post("/v1/projections/nope/rebuild")).status_code == 404
    async with world.client(world.bound) as c:
        assert [r["workflow"] for r in (await c.get("/v1/stats/workflows")).json()["items"]] == ["two-steps"]
        assert (await c.post("/v1/projections/timeline/rebuild")).status_code == 403


async def test_pages_and_guard_headers(world: World) -> None:
    async with world.client() as c:
        page = await c.get("/ui/executions")
        assert page.status_code == 200 and 'data-auth="on"' in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert page.headers["x-frame-options"] == "DENY"
        assert "<script>" not in page.text  # no inline script anywhere
        assert (await c.get("/ui/executions/not%20an%20id")).status_code == 404
        assert (await c.get("/ui/static/console.js")).status_code == 200
        api = await c.get("/v1/executions")
        assert api.status_code == 401 and api.headers["x-frame-options"] == "DENY"
        assert (await c.get("/ui", follow_redirects=False)).headers["location"] == "/ui/executions"
    async with world.client(world.admin, Origin="http://evil.example") as c:
        forged = await c.post("/v1/executions", json={"workflow": "two-steps"})
        assert forged.status_code == 403 and "cross-site" in forged.text
    async with world.client(world.admin, Origin=world.url) as c:
        assert (await c.post("/v1/executions", json={"workflow": "two-steps"})).status_code == 201
    async with world.client(world.admin, **{"Sec-Fetch-Site": "cross-site"}) as c:
        assert (await c.post("/v1/executions", json={"workflow": "two-steps"})).status_code == 403


async def test_auth_off_answers_loopback_host_names_only(world: World) -> None:
    # The app as `weft up` builds it with auth off: a page of another site that resolves its own name
    # to 127.0.0.1 (DNS rebinding) sends its own Host, and is refused.
    app = create_app(world.running.stack.gateway.app.state.ctx, loopback_hosts_only=True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://evil.example:8080") as c:
        r = await c.get("/healthz")
        assert r.status_code == 403 and "loopback" in r.text
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as c:
        assert (await c.get("/healthz")).status_code == 200
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8080") as c:
        assert (await c.get("/healthz")).status_code == 200
