"""Dead letters over HTTP (`/v1/deadletters`), against a real stack on PostgreSQL and NATS:
a step fails for good -> listed (filters, clusters, keys bound to workflows) -> shown ->
fixed -> reprocessed -> the execution completes; the same request again does nothing new;
bad patches are refused before anything is stored; discard needs a reason and records
who and why; scopes; stats; a trigger dead letter republished through the gateway's broker.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import orjson
import pytest

from contracts.subjects import trigger_subject
from services.gateway import routes_deadletters
from services.gateway.keys import Keys
from tests.support import Running, stack_up, wait_until
from tests.integration.steps import FLAKY, POSITIVE

pytestmark = pytest.mark.integration
PARTS = ("orchestrator", "relay", "worker", "projector", "deadletters", "triggers", "gateway")
REPROCESS, DISCARD = "/v1/deadletters/reprocess", "/v1/deadletters/discard"


BAD_MAP = """
name: bad-map
steps:
  - {id: each, type: noop, map: "${{ input.items }}"}
"""


class World:
    def __init__(self, running: Running):
        self.running, self.store = running, running.stack.store
        self.url = running.stack.gateway.url
        self.keys = Keys(self.store)

    def client(self, scopes: list[str], workflows: list[str] | None = None) -> httpx.AsyncClient:
        token, key = self.keys.create(scopes, workflows=workflows)
        client = httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        client.actor = f"key:{key.key_id}"  # type: ignore[attr-defined]
        return client

    async def failed(self, admin: httpx.AsyncClient, text: str, data: Any) -> str:
        r = await admin.post("/v1/workflows", content=text, headers={"content-type": "application/yaml"})
        assert r.status_code in (200, 201), r.text
        r = await admin.post("/v1/executions", json={"workflow": r.json()["workflow"], "input": data})
        assert r.status_code == 201, r.text
        state = await self.running.finished(r.json()["id"])
        assert state.status == "failed", state
        return state.id

    async def head(self) -> int:
        return await asyncio.to_thread(self.store.head)


@pytest.fixture
async def world(tmp_path: Path, pg_url: str, broker_url: str) -> AsyncIterator[World]:
    async with stack_up(tmp_path, pg_url, broker_url, parts=PARTS) as running:
        yield World(running)


async def _listed(c: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    r = await c.get("/v1/deadletters", params=params)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def _problem(r: httpx.Response, status: int = 422) -> tuple[str, str]:
    assert r.status_code == status, r.text
    [problem] = r.json()["error"]["problems"]
    return problem["field"], problem["message"]


async def test_a_dead_letter_is_listed_shown_fixed_and_reprocessed(world: World, tmp_path: Path) -> None:
    flag, log = tmp_path / "backend-up", tmp_path / "attempts.log"
    async with world.client(["admin"]) as admin, world.client(["read"], ["flaky-orders"]) as bound, \
            world.client(["read"]) as reader:
        eid = await world.failed(admin, FLAKY, {"order": "A-1", "flag": str(flag), "log": str(log)})
        other = await world.failed(admin, POSITIVE, {"n": -3})

        # listed at once (the view is brought up to date before a read), newest first
        rows = await _listed(admin)
        assert [r["execution_id"] for r in rows] == [other, eid]
        letter = rows[1]
        assert (letter["kind"], letter["status"], letter["workflow"], letter["step_id"], letter["attempt"]) == (
            "retries_exhausted", "open", "flaky-orders", "charge", 3)
        assert letter["error_type"] == "ConnectionError" and "backend unreachable" in letter["error_message"]

        # filters
        assert [r["id"] for r in await _listed(admin, workflow="flaky-orders")] == [letter["id"]]
        assert [r["id"] for r in await _listed(admin, step="charge", kind="retries_exhausted")] == [letter["id"]]
        assert [r["execution_id"] for r in await _listed(admin, error_contains="MUST BE POSITIVE")] == [other]
        assert len(await _listed(admin, kind="step", since="1h", until="2999-01-01T00:00:00Z")) == 2
        assert await _listed(admin, since="2999-01-01") == [] and await _listed(admin, status="discarded") == []
        page = (await admin.get("/v1/deadletters", params={"limit": 1})).json()
        assert [r["execution_id"] for r in page["items"]] == [other] and page["next_offset"] == 1
        page = (await admin.get("/v1/deadletters", params={"limit": 1, "offset": 1})).json()
        assert [r["execution_id"] for r in page["items"]] == [eid] and page["next_offset"] is None
        assert _problem(await admin.get("/v1/deadletters", params={"since": "yesterday-ish"}))[0] == "query.since"
        assert _problem(await admin.get("/v1/deadletters", params={"until": "99999999d"}))[0] == "query.until"
        assert _problem(await admin.get("/v1/deadletters", params={"kind": "nonsense"}))[0] == "query.kind"
        assert _problem(await admin.get("/v1/deadletters", params={"status": "closed"}))[0] == "query.status"
        assert _problem(await admin.get("/v1/deadletters", params={"limit": 1001}))[0] == "query.limit"
        clusters = (await admin.get("/v1/deadletters", params={"group_by": "error"})).json()
        assert clusters["truncated"] is False
        assert sorted((g["error"], g["count"]) for g in clusters["groups"]) == [
            ("backend unreachable (no backend-up)", 1), ("n must be positive, got <n>", 1)]

        # a key bound to workflows sees theirs only
        assert [r["id"] for r in await _listed(bound)] == [letter["id"]]
        assert [r["id"] for r in await _listed(bound, status="all")] == [letter["id"]]
        r = await bound.get("/v1/deadletters", params={"workflow": "needs-positive"})
        assert r.status_code == 403 and "needs-positive" in r.json()["error"]["message"]
        other_id = rows[0]["id"]
        assert (await bound.get(f"/v1/deadletters/{other_id}")).status_code == 404

        # shown by a short id
        shown = (await bound.get(f"/v1/deadletters/{letter['id'][:8]}")).json()
        assert shown["id"] == letter["id"]
        assert shown["payload"] == {"order": "A-1", "flag": str(flag), "log": str(log)}
        assert "ConnectionError: backend unreachable" in shown["traceback"]
        assert [e["type"] for e in shown["history"]][-2:] == ["StepDeadLettered", "ExecutionFailed"]
        assert shown["details"]["idempotency_key"] == f"{eid}:charge" and shown["acts"] == []
        assert (await admin.get(f"/v1/deadletters/{uuid.uuid4()}")).status_code == 404
        assert (await admin.get("/v1/deadletters/not-an-id")).status_code == 404

        # fixed, then reprocessed; a read-only key may not
        r = await reader.post(REPROCESS, json={"ids": [letter["id"]]})
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
        flag.touch()
        r = await admin.post(REPROCESS, json={"ids": [letter["id"][:8]], "why": "backend is back"})
        assert r.status_code == 200, r.text
        assert r.json()["ok"] is True and r.json()["counts"] == {"reprocessed": 1}
        assert [(o["id"], o["outcome"], o["attempt"]) for o in r.json()["outcomes"]] == [(letter["id"], "reprocessed", 4)]
        done = await world.running.finished(eid)
        assert done.status == "completed" and done.output == {"ok": True, "order": "A-1"}
        attempts = [line.split() for line in log.read_text().splitlines()]
        assert [int(a) for _, a in attempts] == [1, 2, 3, 4] and {k for k, _ in attempts} == {f"{eid}:charge"}

        # the same request again: no new attempt, nothing stored
        head = await world.head()
        again = await admin.post(REPROCESS, json={"ids": [letter["id"][:8]], "why": "backend is back"})
        assert again.status_code == 200 and [o["outcome"] for o in again.json()["outcomes"]] == ["already_reprocessed"]
        assert await world.head() == head
        history = await world.running.history(eid)
        assert sum(1 for e in history if e.type == "StepReprocessRequested") == 1
        assert [e.attempt for e in history if e.type == "StepScheduled" and e.step_id == "charge"] == [1, 2, 3, 4]

        [after] = await _listed(admin, status="reprocessed")
        assert (after["id"], after["actor"], after["action_reason"]) == (letter["id"], admin.actor, "backend is back")
        assert [(a["type"], a["by"]) for a in (await admin.get(f"/v1/deadletters/{letter['id']}")).json()["acts"]] == [
            ("DeadLetterReprocessed", admin.actor)]
        assert await _listed(bound) == []


async def test_patches_discards_scopes_and_stats(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    async with world.client(["admin"]) as admin, world.client(["read", "trigger"]) as reader, \
            world.client(["admin"], ["needs-positive"]) as bound:
        negatives = [await world.failed(admin, POSITIVE, {"n": n}) for n in (-1, -2)]
        mapped = await world.failed(admin, BAD_MAP, {"items": "not a list"})
        rows = await _listed(admin)
        by_execution = {r["execution_id"]: r for r in rows}
        assert by_execution[mapped]["kind"] == "input_error"
        ids = [by_execution[e]["id"] for e in negatives]

        # every patch is checked first: one that cannot apply refuses the whole request, naming its dead letter
        head = await world.head()
        unpatchable = by_execution[mapped]["id"]
        field, message = _problem(await admin.post(REPROCESS, json={"ids": [*ids, unpatchable], "patch": {"n": 5}}))
        assert field == "body.patch" and unpatchable in message and "no input to patch" in message
        assert _problem(await admin.post(REPROCESS, json={"ids": ids, "patch": [1, 2]}))[0] == "body.patch"
        assert _problem(await admin.post(REPROCESS, json={"ids": ids, "filter": {}}))[0] == "body.filter"
        assert _problem(await admin.post(REPROCESS, json={}))[0] == "body.ids"
        assert _problem(await admin.post(REPROCESS, json={"filter": {"colour": "red"}}))[0] == "body.filter.colour"
        assert _problem(await admin.post(REPROCESS, json={"ids": ["ffffffff"]}), 404)[0] == "body.ids.0"
        assert await world.head() == head and len(await _listed(admin)) == 3

        # a dry run shows what would go out, and stores nothing
        dry = (await admin.post(REPROCESS, json={"ids": ids[:1], "patch": {"n": 5}, "dry_run": True})).json()
        [outcome] = dry["outcomes"]
        assert (dry["dry_run"], outcome["outcome"], outcome["preview"]) == (True, "would_reprocess", {"n": 5})
        assert await world.head() == head

        # ambiguous prefixes are refused, naming the field
        monkeypatch.setattr(routes_deadletters, "find", lambda tx, ref: rows[:2])
        r = await admin.get("/v1/deadletters/abcd")
        assert r.json()["error"]["code"] == "ambiguous" and _problem(r)[0] == "path.dead_letter_id"
        monkeypatch.undo()

        # discard: a reason is required; scopes; a bound key acts on its workflows only
        assert _problem(await admin.post(DISCARD, json={"ids": ids}))[0] == "body.reason"
        assert _problem(await admin.post(DISCARD, json={"ids": ids, "reason": "  "}))[0] == "body.reason"
        assert (await reader.post(DISCARD, json={"ids": ids, "reason": "x"})).status_code == 403
        assert (await bound.post(DISCARD, json={"ids": [unpatchable], "reason": "x"})).status_code == 404
        assert (await bound.post(DISCARD, json={"filter": {"workflow": "bad-map"}, "reason": "x"})).status_code == 403
        dry = await bound.post(DISCARD, json={"filter": {}, "reason": "test data", "dry_run": True})
        assert sorted((o["id"], o["outcome"]) for o in dry.json()["outcomes"]) == sorted((i, "would_discard") for i in ids)
        assert await world.head() == head
        r = await bound.post(DISCARD, json={"filter": {"workflow": "needs-positive"}, "reason": " test data "})
        assert r.status_code == 200 and r.json()["counts"] == {"discarded": 2}
        again = await bound.post(DISCARD, json={"ids": ids, "reason": "twice"})
        assert again.json()["counts"] == {"already_discarded": 2} and again.json()["ok"] is True
        refused = (await admin.post(REPROCESS, json={"ids": ids[:1]})).json()
        assert refused["ok"] is False and refused["outcomes"][0]["outcome"] == "already_discarded"
        discarded = await _listed(admin, status="discarded")
        assert sorted((r["id"], r["actor"], r["action_reason"]) for r in discarded) == sorted(
            (i, bound.actor, "test data") for i in ids)
        acts = (await admin.get(f"/v1/deadletters/{ids[0]}")).json()["acts"]
        assert [(a["type"], a["by"], a["why"]) for a in acts] == [("DeadLetterDiscarded", bound.actor, "test data")]
        state = await asyncio.to_thread(world.running.reader.load, negatives[0], fresh=True)
        assert state.status == "failed"  # a discard never touches the execution

        # stats, as `weft dlq stats --json` gives them
        stats = (await reader.get("/v1/deadletters/stats")).json()
        assert stats == {
            "open": [{"id": "input_error/bad-map", "kind": "input_error", "workflow": "bad-map", "count": 1}],
            "by_status": {"open": 1, "reprocessed": 0, "discarded": 2},
        }
        mine = (await bound.get("/v1/deadletters/stats")).json()
        assert mine == {"open": [], "by_status": {"open": 0, "reprocessed": 0, "discarded": 2}}


async def test_a_trigger_dead_letter_is_republished_through_the_gateway(world: World) -> None:
    transport = world.running.stack.transport
    event = {"specversion": "1.0", "id": "evt-1", "source": "shop", "type": "order.created", "data": {"qty": "x"}}
    subject = trigger_subject("order.created")
    await transport.dead_letter("trigger_unroutable", orjson.dumps(event), reason="no workflow subscribes to it",
                                source_subject=subject, msg_id="dlq:WEFT_TRIGGERS:1")
    async with world.client(["admin"]) as admin, world.client(["admin"], ["orders"]) as bound:
        letter = await wait_until(lambda: _listed(admin, kind="trigger_unroutable"), timeout=20, what="the dead letter")
        assert letter[0]["workflow"] is None and await _listed(bound, status="all") == []  # about no workflow of theirs
        shown = (await admin.get(f"/v1/deadletters/{letter[0]['id']}")).json()
        assert shown["payload"] == event and shown["history"] == []
        wf = "name: orders\non: [{event: order.created}]\nsteps: [{id: a, type: noop}]\noutput: '${{ input.qty }}'\n"
        r = await admin.post("/v1/workflows", content=wf, headers={"content-type": "application/yaml"})
        assert r.status_code == 201, r.text
        r = await admin.post(REPROCESS, json={"filter": {"kind": "trigger_unroutable"}, "patch": {"data": {"qty": 2}}})
        assert [(o["outcome"], o["detail"]) for o in r.json()["outcomes"]] == [("republished", f"to {subject}")]

        async def started() -> Any:
            rows = (await admin.get("/v1/executions", params={"workflow": "orders"})).json()["items"]
            return rows[0] if rows else None

        execution = await wait_until(started, timeout=20, what="the republished trigger to start orders")
        assert (await world.running.finished(execution["id"])).output == 2
