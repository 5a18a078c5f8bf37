"""Auth over a real stack: every route × every kind of caller, keys bound to workflows
(reaching another workflow's resources), and webhook signatures (valid, invalid, missing)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import hmac
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx
import pytest
import pytest_asyncio

from services.gateway.keys import Keys
from services.triggers.webhooks import sign
from tests.support import Running, stack_up, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
PARTS = ("orchestrator", "relay", "worker", "projector", "triggers", "gateway")
SECRET_ENV = "WEFT_TEST_ORDERS_SECRET"
SECRET = "s3cret-for-tests"


def wf(name: str, on: str) -> str:
    return f"name: {name}\non: [{on}]\nsteps: [{{id: a, type: noop}}]\n"


@dataclass
class World:
    running: Running
    url: str
    tokens: dict[str, str | None] = field(default_factory=dict)
    executions: dict[str, str] = field(default_factory=dict)  # workflow -> a finished execution of it

    def client(self, who: str) -> httpx.AsyncClient:
        token = self.tokens[who]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, nats_server: Any) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("auth")
    os.environ[SECRET_ENV] = SECRET  # the gateway reads webhook secrets from its environment
    try:
        async with stack_up(tmp, f"sqlite:///{tmp / 'weft.db'}", nats_server.url, parts=PARTS) as running:
            yield await _populate(running)
    finally:
        os.environ.pop(SECRET_ENV, None)


async def _populate(running: Running) -> World:
    keys = Keys(running.stack.store)
    w = World(running, running.stack.gateway.url)
    w.tokens["none"] = None
    w.tokens["garbage"] = "weft_0000abcd_" + "x" * 43
    for scope in ("read", "trigger", "admin"):
        w.tokens[scope], _ = keys.create([scope], name=scope)
    revoked, key = keys.create(["admin"], name="revoked")
    keys.revoke(key.key_id)
    w.tokens["revoked"] = revoked
    w.tokens["bound-admin"], _ = keys.create(["admin"], workflows=["alpha"], events=["alpha.*"])
    w.tokens["bound-no-events"], _ = keys.create(["admin"], workflows=["alpha"])
    w.tokens["bound-read"], _ = keys.create(["read"], workflows=["alpha", "gamma"])
    async with w.client("admin") as admin:
        for name, on in (("alpha", "{event: alpha.happened}"), ("beta", "{event: beta.happened}"),
                         ("shared", "{event: both.happened}"), ("alpha-too", "{event: both.happened}"),
                         ("hooked", f"{{webhook: {{path: /orders, secret_env: {SECRET_ENV}}}}}"),
                         ("open-hook", "{webhook: {path: /open}}"),
                         ("broken-hook", "{webhook: {path: /broken, secret_env: WEFT_TEST_NOT_SET_ANYWHERE}}")):
            r = await admin.post("/v1/workflows", content=wf(name, on), headers={"content-type": "application/yaml"})
            assert r.status_code in (200, 201), r.text
        for name in ("alpha", "beta"):
            r = await admin.post("/v1/executions", json={"workflow": name, "input": {}})
            w.executions[name] = r.json()["id"]
        for eid in w.executions.values():
            await wait_until(lambda eid=eid: _finished(admin, eid), timeout=20)
    return w


async def _finished(c: httpx.AsyncClient, eid: str) -> bool:
    return (await c.get(f"/v1/executions/{eid}")).json()["status"] == "completed"


# (method, path, body, scope needed); {alpha} is a finished execution of workflow alpha
ROUTES: list[tuple[str, str, Any, str | None]] = [
    ("GET", "/v1/workflows", None, "read"),
    ("GET", "/v1/workflows/alpha", None, "read"),
    ("GET", "/v1/workflows/alpha/versions", None, "read"),
    ("GET", "/v1/workflows/alpha/versions/1", None, "read"),
    ("POST", "/v1/workflows", wf("alpha", "{event: alpha.happened}"), "admin"),
    ("POST", "/v1/executions", {"workflow": "alpha", "input": {}}, "trigger"),
    ("GET", "/v1/executions", None, "read"),
    ("GET", "/v1/executions/{alpha}", None, "read"),
    ("GET", "/v1/executions/{alpha}/history", None, "read"),
    ("GET", "/v1/executions/{alpha}/events", None, "read"),
    ("POST", "/v1/executions/{alpha}/cancel", {}, "admin"),
    ("POST", "/v1/executions/{alpha}/pause", {}, "admin"),
    ("POST", "/v1/executions/{alpha}/resume", {}, "admin"),
    ("POST", "/v1/executions/{alpha}/retry", {}, "admin"),
    ("POST", "/v1/triggers", {"type": "alpha.happened", "data": {}}, "trigger"),
    ("POST", "/v1/executions/{alpha}/replay", {"dry_run": True}, "trigger"),
    ("POST", "/v1/replays", {"filter": {"workflow": "alpha"}, "dry_run": True}, "admin"),
    ("POST", "/v1/backfills", {"workflow": "alpha", "from": "2020-01-01T00:00:00Z", "to": "2020-01-02T00:00:00Z",
                               "dry_run": True}, "admin"),
    ("GET", "/v1/deadletters", None, "read"),
    ("GET", "/v1/deadletters/stats", None, "read"),
    ("GET", "/v1/deadletters/00000000", None, "read"),
    ("POST", "/v1/deadletters/reprocess", {"filter": {"workflow": "alpha"}, "dry_run": True}, "admin"),
    ("POST", "/v1/deadletters/discard", {"filter": {"workflow": "alpha"}, "reason": "matrix", "dry_run": True}, "admin"),
    ("GET", "/v1/keys", None, "admin"),
    ("POST", "/v1/keys", {"scopes": ["read"], "name": "matrix"}, "admin"),
    ("DELETE", "/v1/keys/deadbeef", None, "admin"),
    ("GET", "/metrics", None, "read"),
    ("GET", "/healthz", None, None),
    ("GET", "/readyz", None, None),
    ("GET", "/v1/openapi.json", None, None),
]
CALLERS = ("none", "garbage", "revoked", "read", "trigger", "admin")
GRANTS = {"read": {"read"}, "trigger": {"trigger"}, "admin": {"read", "trigger", "admin"}}


async def _call(c: httpx.AsyncClient, method: str, path: str, body: Any) -> httpx.Response:
    if isinstance(body, str):
        return await c.request(method, path, content=body, headers={"content-type": "application/yaml"})
    return await c.request(method, path, json=body)


@pytest.mark.parametrize("who", CALLERS)
@pytest.mark.parametrize(("method", "path", "body", "scope"), ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
async def test_route_by_scope(world: World, who: str, method: str, path: str, body: Any, scope: str | None) -> None:
    async with world.client(who) as c:
        r = await _call(c, method, path.format(alpha=world.executions["alpha"]), body)
    if scope is None:
        assert r.status_code == 200, r.text
    elif who in ("none", "garbage", "revoked"):
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    elif scope in GRANTS[who]:
        assert r.status_code not in (401, 403), r.text
        assert r.status_code < 500, r.text
    else:
        assert r.status_code == 403, r.text
        assert scope in r.json()["error"]["message"]


async def test_a_bound_key_cannot_reach_another_workflows_resources(world: World) -> None:
    alpha, beta = world.executions["alpha"], world.executions["beta"]
    async with world.client("bound-admin") as c:
        assert (await c.get(f"/v1/executions/{alpha}")).status_code == 200
        for method, path in (("GET", f"/v1/executions/{beta}"), ("GET", f"/v1/executions/{beta}/history"),
                             ("GET", f"/v1/executions/{beta}/events"), ("POST", f"/v1/executions/{beta}/cancel"),
                             ("POST", f"/v1/executions/{beta}/retry"), ("GET", "/v1/workflows/beta"),
                             ("GET", "/v1/workflows/beta/versions")):
            assert (await c.request(method, path)).status_code == 404, (method, path)
        assert (await c.post("/v1/executions", json={"workflow": "beta", "input": {}})).status_code == 403
        assert (await c.get("/metrics")).status_code == 403  # it counts every workflow
        r = await c.post("/v1/workflows", content=wf("beta", "{event: x.y}"), headers={"content-type": "application/yaml"})
        assert r.status_code == 403
        assert [w["workflow"] for w in (await c.get("/v1/workflows")).json()["items"]] == ["alpha"]

        async def only_alpha() -> bool:
            rows = (await c.get("/v1/executions")).json()["items"]
            return bool(rows) and {r["workflow"] for r in rows} == {"alpha"}

        await wait_until(only_alpha, timeout=10)
        assert (await c.get("/v1/executions", params={"workflow": "beta"})).json()["items"] == []
        # a topic shared with another workflow would start it too
        shared = await c.post("/v1/triggers", json={"type": "both.happened", "data": {}})
        assert shared.status_code == 403 and "shared" in shared.json()["error"]["message"]
        assert (await c.post("/v1/triggers", json={"type": "beta.happened"})).status_code == 403
        assert (await c.post("/v1/triggers", json={"type": "alpha.happened"})).status_code == 202
        assert (await c.post(f"/v1/executions/{beta}/replay", json={"dry_run": True})).status_code == 404
        assert (await c.post("/v1/replays", json={"filter": {"status": "completed"}, "dry_run": True})).status_code == 403
        assert (await c.post("/v1/replays", json={"filter": {"workflow": "beta"}, "dry_run": True})).status_code == 403
        assert (await c.post("/v1/backfills", json={"workflow": "beta", "from": "2020-01-01T00:00:00Z",
                                                    "to": "2020-01-02T00:00:00Z"})).status_code == 403
        assert (await c.get("/v1/keys")).status_code == 403  # no escalation through new keys
        assert (await c.post("/v1/keys", json={"scopes": ["admin"]})).status_code == 403
    async with world.client("bound-read") as c:
        assert (await c.get(f"/v1/executions/{alpha}")).status_code == 200
        assert (await c.get(f"/v1/executions/{beta}")).status_code == 404
        assert (await c.post(f"/v1/executions/{alpha}/cancel")).status_code == 403


async def test_a_signed_webhook_starts_once_per_delivery(world: World) -> None:
    body = b'{"order_id": "W-1", "total": 12}'
    headers = {"content-type": "application/json", "X-Weft-Signature": sign(SECRET, body, int(time.time())),
               "X-Weft-Delivery": "dlv-1"}
    async with httpx.AsyncClient(base_url=world.url, timeout=30) as c:  # no API key: the signature is the proof
        first = await c.post("/v1/webhooks/orders", content=body, headers=headers)
        assert first.status_code == 202, first.text
        assert first.json()["duplicate"] is False and first.json()["deduplicated"] is True
        [eid] = first.json()["executions"].values()
        again = await c.post("/v1/webhooks/orders", content=body, headers=headers)
        assert again.status_code == 202 and again.json()["duplicate"] is True
        assert list(again.json()["executions"].values()) == [eid]
    async with world.client("admin") as admin:
        await wait_until(lambda: _finished(admin, eid), timeout=20)
        got = (await admin.get(f"/v1/executions/{eid}")).json()
        assert got["input"] == {"order_id": "W-1", "total": 12}
        assert got["trigger"]["source"] == "weft:webhook/orders" and got["trigger"]["id"] == "dlv-1"
        assert got["trigger"]["via"] == "webhook"
        rows = (await admin.get("/v1/executions", params={"workflow": "hooked"})).json()["items"]
        assert [r["id"] for r in rows] == [eid]


@pytest.mark.parametrize(
    ("signature", "why"),
    [(None, "no webhook accepts"), ("t=1,v1=" + "0" * 64, "no webhook accepts"), ("tampered", "no webhook accepts"),
     ("md5=abc", "no webhook accepts"), ("body-only", "no webhook accepts"), ("expired", "300s")],
)
async def test_a_webhook_with_a_bad_or_missing_signature_is_refused(world: World, signature: str | None, why: str) -> None:
    body = b'{"order_id": "W-2"}'
    headers = {"content-type": "application/json", "X-Weft-Delivery": f"bad-{uuid.uuid4()}"}
    if signature == "tampered":
        signature = sign(SECRET, body + b" ", int(time.time()))
    elif signature == "body-only":  # the old, replayable form: HMAC of the body alone
        signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    elif signature == "expired":  # a captured request, replayed after the window
        signature = sign(SECRET, body, int(time.time()) - 301)
    if signature is not None:
        headers["X-Weft-Signature"] = signature
    async with httpx.AsyncClient(base_url=world.url, timeout=30) as c:
        r = await c.post("/v1/webhooks/orders", content=body, headers=headers)
        assert r.status_code == 401 and why in r.json()["error"]["message"]
        # a valid key does not replace the signature
        r = await c.post("/v1/webhooks/orders", content=body,
                         headers={**headers, "Authorization": f"Bearer {world.tokens['admin']}"})
        assert r.status_code == 401


async def test_unsigned_misconfigured_and_unknown_webhooks(world: World) -> None:
    async with world.client("none") as anon, world.client("read") as reader, world.client("trigger") as trig:
        assert (await anon.post("/v1/webhooks/open", json={"a": 1})).status_code == 401
        assert (await reader.post("/v1/webhooks/open", json={"a": 1})).status_code == 403
        r = await trig.post("/v1/webhooks/open", json={"a": 1})
        assert r.status_code == 202 and r.json()["deduplicated"] is False and len(r.json()["executions"]) == 1
        broken = await anon.post("/v1/webhooks/broken", json={}, headers={"X-Weft-Signature": "sha256=00"})
        assert broken.status_code == 503 and "WEFT_TEST_NOT_SET" not in broken.text
        # An unknown path answers exactly as a bad signature does, and as an unsigned webhook without a key.
        body = b'{"a": 1}'
        bad = {"content-type": "application/json", "X-Weft-Signature": sign("guess", body, int(time.time()))}
        answers = [await anon.post(path, content=body, headers=headers) for path, headers in (
            ("/v1/webhooks/nowhere", bad), ("/v1/webhooks/orders", bad), ("/v1/webhooks/nowhere", {}),
            ("/v1/webhooks/orders", {}), ("/v1/webhooks/open", {}))]
        assert {(r.status_code, r.content) for r in answers} == {(answers[0].status_code, answers[0].content)}
        assert answers[0].status_code == 401


CARD = "4111 1111 1111 1111"
RANGE = {"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}


async def test_a_bound_key_cannot_reach_another_workflows_trigger_data(world: World) -> None:
    """The two leaks of issue 14: backfilling A with B's event type, and subscribing A to B's type
    (or B's webhook path). Both came back 2xx with B's data before event types were bound to keys."""
    async with world.client("admin") as admin:
        sent = await admin.post("/v1/triggers", json={"type": "beta.happened", "data": {"card": CARD}})
        assert sent.status_code == 202, sent.text
        body = b'{"card": "%s"}' % CARD.encode()
        hook = await admin.post("/v1/webhooks/orders", content=body, headers={
            "content-type": "application/json", "X-Weft-Signature": sign(SECRET, body, int(time.time())),
            "X-Weft-Delivery": f"leak-{uuid.uuid4()}"})
        assert hook.status_code == 202, hook.text

        async def recorded() -> bool:  # the unbound admin can backfill beta from the trigger log
            r = await admin.post("/v1/backfills", json={"workflow": "beta", **RANGE, "dry_run": True})
            return r.status_code == 200 and r.json()["total"] >= 1
        await wait_until(recorded, timeout=20)
        before = len((await admin.get("/v1/executions", params={"workflow": "alpha", "limit": 500})).json()["items"])

    async with world.client("bound-admin") as c:
        # leak 1: backfill A with B's event type
        r = await c.post("/v1/backfills", json={"workflow": "alpha", "event_type": "beta.happened", **RANGE})
        assert r.status_code == 403, r.text
        assert "beta.happened" in r.json()["error"]["message"] and "alpha.*" in r.json()["error"]["message"]
        # ... nor through the webhook type, which would hold every path's deliveries: those are filtered by path
        r = await c.post("/v1/backfills", json={"workflow": "alpha", "event_type": "weft.webhook", **RANGE,
                                                 "dry_run": True})
        assert r.status_code == 200 and r.json()["items"] == [], r.text
        # leak 2: subscribe A to B's event type, or to B's webhook path
        for on in ("{event: beta.happened}", "{webhook: {path: /orders}}", "{event: both.happened}"):
            r = await c.post("/v1/workflows", content=wf("alpha", on), headers={"content-type": "application/yaml"})
            assert r.status_code == 403, (on, r.text)
            assert r.json()["error"]["problems"][0]["field"] == "body.on"
        # inside its binding both still work
        r = await c.post("/v1/workflows", content=wf("alpha", "{event: alpha.other}"),
                         headers={"content-type": "application/yaml"})
        assert r.status_code in (200, 201), r.text
        r = await c.post("/v1/backfills", json={"workflow": "alpha", "event_type": "alpha.happened", **RANGE,
                                                 "dry_run": True})
        assert r.status_code == 200, r.text
    async with world.client("bound-no-events") as c:  # a bound key without --events may use no event type
        r = await c.post("/v1/workflows", content=wf("alpha", "{event: alpha.happened}"),
                         headers={"content-type": "application/yaml"})
        assert r.status_code == 403 and "empty" in r.json()["error"]["message"]
        r = await c.post("/v1/backfills", json={"workflow": "alpha", "event_type": "alpha.happened", **RANGE})
        assert r.status_code == 403
    async with world.client("bound-read") as reader, world.client("admin") as admin:
        rows = (await admin.get("/v1/executions", params={"workflow": "alpha", "limit": 500})).json()["items"]
        assert len(rows) == before  # nothing was started for alpha
        for row in (await reader.get("/v1/executions", params={"limit": 500})).json()["items"]:
            got = await reader.get(f"/v1/executions/{row['id']}")
            assert CARD not in got.text


async def test_an_event_binding_needs_a_workflow_binding(world: World) -> None:
    async with world.client("admin") as admin:
        r = await admin.post("/v1/keys", json={"scopes": ["admin"], "events": ["order.*"]})
        assert r.status_code == 422 and "events" in r.text
        r = await admin.post("/v1/keys", json={"scopes": ["admin"], "workflows": ["alpha"], "events": ["bad type!"]})
        assert r.status_code == 422
        r = await admin.post("/v1/keys", json={"scopes": ["read"], "workflows": ["alpha"], "events": ["alpha.*"]})
        assert r.status_code == 201 and r.json()["events"] == ["alpha.*"]


async def test_a_signature_is_good_for_one_delivery(world: World) -> None:
    """Inside the window, the same body and signature under a new (or no) delivery id start nothing."""
    body = b'{"order_id": "W-3"}'
    sig = sign(SECRET, body, int(time.time()))
    base = {"content-type": "application/json", "X-Weft-Signature": sig}
    async with httpx.AsyncClient(base_url=world.url, timeout=30) as c:
        first = await c.post("/v1/webhooks/orders", content=body, headers={**base, "X-Weft-Delivery": "one-3"})
        assert first.status_code == 202, first.text
        [eid] = first.json()["executions"].values()
        retry = await c.post("/v1/webhooks/orders", content=body, headers={**base, "X-Weft-Delivery": "one-3"})
        assert retry.status_code == 202 and retry.json()["duplicate"] is True  # the sender's own retry
        for headers in ({**base, "X-Weft-Delivery": "two-3"}, base, {**base, "Idempotency-Key": "three-3"}):
            replay = await c.post("/v1/webhooks/orders", content=body, headers=headers)
            assert replay.status_code == 409, replay.text
            assert "already used" in replay.json()["error"]["message"]
        # Without a delivery id the signature stands for the delivery: sent twice, it starts once.
        lone = sign(SECRET, b'{"order_id": "W-4"}', int(time.time()))
        a = await c.post("/v1/webhooks/orders", content=b'{"order_id": "W-4"}',
                         headers={"content-type": "application/json", "X-Weft-Signature": lone})
        b = await c.post("/v1/webhooks/orders", content=b'{"order_id": "W-4"}',
                         headers={"content-type": "application/json", "X-Weft-Signature": lone})
        assert a.status_code == b.status_code == 202 and b.json()["duplicate"] is True
        assert a.json()["executions"] == b.json()["executions"]
    async with world.client("admin") as admin:
        rows = (await admin.get("/v1/executions", params={"workflow": "hooked", "limit": 500})).json()["items"]
        started = [r for r in rows if r["id"] == eid]
        assert len(started) == 1


# The README's example, as a user runs it (GATEWAY, SECRET and BODY set first).
CURL_RECIPE = """
T=$(date +%s)
SIG=$(printf '%s.%s' "$T" "$BODY" | openssl dgst -sha256 -hmac "$SECRET" | awk '{print $NF}')
curl -sS -X POST "$GATEWAY/v1/webhooks/orders" \\
  -H 'Content-Type: application/json' \\
  -H "X-Weft-Delivery: order-A-1" \\
  -H "X-Weft-Signature: t=$T,v1=$SIG" \\
  --data-binary "$BODY"
"""


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("openssl")) and os.environ.get("CI") != "true",
                    reason="needs curl and openssl (required under CI=true)")
async def test_the_readme_curl_recipe_works(world: World) -> None:
    env = {"PATH": os.environ["PATH"], "GATEWAY": world.url, "SECRET": SECRET, "BODY": '{"order_id": "A-1"}'}
    proc = await asyncio.to_thread(subprocess.run, ["bash", "-c", CURL_RECIPE], env=env, capture_output=True,
                                   text=True, timeout=30)
    answer = json.loads(proc.stdout)
    assert answer["id"] == "order-A-1" and len(answer["executions"]) == 1, proc.stdout + proc.stderr
