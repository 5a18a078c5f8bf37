"""Starts through real HTTP on SQLite and PostgreSQL: one at a time (group-committed when
concurrent), in batches (`POST /v1/executions:batch`, per-item outcomes), and idempotency
keys within a batch, across concurrent requests, and against different inputs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest

from services.gateway.models import MAX_BATCH
from tests.support import Running, stack_up, wait_until

pytestmark = pytest.mark.integration
PARTS = ("orchestrator", "relay", "worker", "projector", "gateway")
ECHO = """
name: echo
input_schema: {type: object, required: [msg], properties: {msg: {type: string}}}
steps:
  - {id: say, type: transform, with: {expression: "msg"}, input: {msg: "${{ input.msg }}"}}
output: "${{ steps.say.output }}"
"""


async def _token(running: Running) -> str:
    from services.gateway.keys import Keys

    token, _ = await asyncio.to_thread(Keys(running.stack.store).create, ["admin"])
    return str(token)


@pytest.fixture
async def api(tmp_path: Path, db_url: str, nats_url: str) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    async with stack_up(tmp_path, db_url, nats_url, parts=PARTS) as running:
        running.token = await _token(running)  # type: ignore[attr-defined]
        async with httpx.AsyncClient(base_url=running.stack.gateway.url, timeout=60,
                                     headers={"Authorization": f"Bearer {running.token}"}) as client:  # type: ignore[attr-defined]
            r = await client.post("/v1/workflows", content=ECHO, headers={"content-type": "application/yaml"})
            assert r.status_code == 201, r.text
            yield running, client


def executions_stored(running: Running) -> int:
    return len(running.stack.store.read(0, 100_000, types=["ExecutionStarted"]))


async def finished(client: httpx.AsyncClient, eid: str) -> dict[str, Any]:
    async def done() -> Any:
        body = (await client.get(f"/v1/executions/{eid}")).json()
        return body if body["status"] in ("completed", "failed") else None
    return await wait_until(done, timeout=30, what=f"{eid} to finish")


async def test_concurrent_single_starts_are_group_committed_and_all_run(api: Any) -> None:
    running, client = api
    rs = await asyncio.gather(*(client.post("/v1/executions", json={"workflow": "echo", "input": {"msg": str(n)}})
                                for n in range(60)))
    assert [r.status_code for r in rs] == [201] * 60
    ids = {r.json()["id"] for r in rs}
    assert len(ids) == 60 and executions_stored(running) == 60
    gc = running.stack.gateway.app.state.ctx.starts
    assert gc.requests == 60 and gc.flushes < 60  # concurrent requests shared transactions
    for r in rs[:5]:
        assert (await finished(client, r.json()["id"]))["output"] == r.json()["input"]["msg"]


async def test_the_fast_path_answers_as_the_route_does(api: Any) -> None:
    """services/gateway/fast_starts.py answers plain starts below FastAPI; what it hands over
    (a query string here) the route answers. Both bodies must be the same document."""
    running, client = api
    fast = await client.post("/v1/executions", json={"workflow": "echo", "input": {"msg": "f"}},
                             headers={"Idempotency-Key": "fast-1"})
    routed = await client.post("/v1/executions?via=route", json={"workflow": "echo", "input": {"msg": "f"}},
                               headers={"Idempotency-Key": "fast-1"})
    assert (fast.status_code, routed.status_code) == (201, 200)
    a, b = fast.json(), routed.json()
    assert (a.pop("created"), b.pop("created")) == (True, False)
    a.pop("status"), b.pop("status"), a.pop("events"), b.pop("events"), a.pop("steps"), b.pop("steps")
    a.pop("duration_ms", None), b.pop("duration_ms", None), a.pop("finished_at"), b.pop("finished_at")
    a.pop("output"), b.pop("output")
    assert a == b
    bad = await client.post("/v1/executions", json={"workflow": "echo", "input": {"msg": 1}})
    assert bad.status_code == 422 and bad.json()["error"]["problems"][0]["field"] == "body.input.msg"
    assert (await client.post("/v1/executions", json={"workflow": "echo", "input": {"msg": "x"}, "extra": 1})
            ).json()["error"]["problems"][0]["field"] == "body.extra"
    assert (await client.post("/v1/executions", json={"workflow": "nope"})).status_code == 404


async def test_concurrent_identical_keys_start_one_execution(api: Any) -> None:
    running, client = api
    same = {"workflow": "echo", "input": {"msg": "x"}}
    rs = await asyncio.gather(*(client.post("/v1/executions", json=same, headers={"Idempotency-Key": "k-1"})
                                for _ in range(20)))
    assert sorted(r.status_code for r in rs) == [200] * 19 + [201]
    assert len({r.json()["id"] for r in rs}) == 1 and executions_stored(running) == 1
    other = await asyncio.gather(*(client.post("/v1/executions", json={"workflow": "echo", "input": {"msg": "y"}},
                                               headers={"Idempotency-Key": "k-1"}) for _ in range(5)))
    assert {r.status_code for r in other} == {409}
    assert other[0].json()["error"]["code"] == "idempotency_conflict"
    assert executions_stored(running) == 1


async def test_a_batch_has_an_outcome_per_item_with_duplicates_inside(api: Any) -> None:
    running, client = api
    items = [
        {"workflow": "echo", "input": {"msg": "a"}, "idempotency_key": "b-1"},
        {"workflow": "echo", "input": {"msg": "a"}, "idempotency_key": "b-1"},  # a repeat: the same execution
        {"workflow": "echo", "input": {"msg": "other"}, "idempotency_key": "b-1"},  # same key, other input
        {"workflow": "echo", "input": {"msg": 7}},  # invalid input
        {"workflow": "nope", "input": {}},  # no such workflow
        {"workflow": "echo", "version": 9, "input": {"msg": "v"}},  # no such version
        {"workflow": "echo", "input": {"msg": "b"}},
    ]
    r = await client.post("/v1/executions:batch", json={"items": items})
    assert r.status_code == 200, r.text
    out = r.json()["items"]
    assert [o["status"] for o in out] == [201, 200, 409, 422, 404, 404, 201]
    assert out[0]["execution_id"] == out[1]["execution_id"] == out[2]["execution_id"]
    assert out[1]["created"] is False and out[2]["error"]["code"] == "idempotency_conflict"
    assert out[3]["error"]["problems"][0]["field"] == "body.items[3].input.msg"
    assert (r.json()["started"], r.json()["existing"], r.json()["failed"]) == (2, 1, 4)
    assert executions_stored(running) == 2
    done = await finished(client, out[6]["execution_id"])
    assert done["output"] == "b"
    again = (await client.post("/v1/executions:batch", json={"items": items[:1]})).json()["items"]
    assert again[0]["status"] == 200 and again[0]["execution_id"] == out[0]["execution_id"]
    # the single-start path agrees with the batch about the same key
    single = await client.post("/v1/executions", json={"workflow": "echo", "input": {"msg": "a"}},
                               headers={"Idempotency-Key": "b-1"})
    assert single.status_code == 200 and single.json()["id"] == out[0]["execution_id"]


async def test_an_oversize_or_malformed_batch_is_refused_whole(api: Any) -> None:
    running, client = api
    too_many = [{"workflow": "echo", "input": {"msg": str(n)}} for n in range(MAX_BATCH + 1)]
    r = await client.post("/v1/executions:batch", json={"items": too_many})
    assert r.status_code == 422
    [problem] = r.json()["error"]["problems"]
    assert problem["field"] == "body.items" and f"at most {MAX_BATCH} items" in problem["message"]
    hostile = [
        {"items": [{"workflow": "echo", "input": {"msg": "ok"}}, "not an object"]},
        {"items": [{"workflow": "echo", "input": {"msg": "ok"}}, {"workflow": "echo", "extra": 1}]},
        {"items": [{"workflow": "echo", "input": {"msg": "ok"}}, {"workflow": "x" * 129}]},
        {"items": [{"workflow": "echo", "input": {"msg": "ok"}, "idempotency_key": "k" * 257}]},
        {"items": []},
        {"items": {"workflow": "echo"}},
        [],
    ]
    for body in hostile:
        r = await client.post("/v1/executions:batch", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["problems"][0]["field"].startswith("body"), r.text
    r = await client.post("/v1/executions:batch", content=b'{"items": [{"workflow": "echo", "input": ' +
                          b'{"d": ' * 5000 + b'1' + b'}' * 5000 + b'}]}', headers={"content-type": "application/json"})
    assert r.status_code in (400, 413, 422), r.text
    assert executions_stored(running) == 0  # nothing half-stored
    ok = await client.post("/v1/executions:batch", json={"items": [{"workflow": "echo", "input": {"msg": "fine"}}]})
    assert ok.status_code == 200 and ok.json()["items"][0]["status"] == 201  # a normal batch still works
    assert (await finished(client, ok.json()["items"][0]["execution_id"]))["output"] == "fine"


async def test_the_client_starts_many(api: Any) -> None:
    from weft.client import AsyncClient, Client

    running, _ = api
    url = running.stack.gateway.url
    with Client(url, api_key=running.token) as c:
        out = await asyncio.to_thread(c.start_many, [
            {"workflow": "echo", "input": {"msg": "1"}, "idempotency_key": "c-1"},
            {"workflow": "echo", "input": {"msg": "2"}}])
    assert [o.status for o in out.items] == [201, 201]
    async with AsyncClient(url, api_key=running.token) as ac:
        again = await ac.start_many([{"workflow": "echo", "input": {"msg": "1"}, "idempotency_key": "c-1"}])
    assert again.items[0].status == 200 and again.items[0].execution_id == out.items[0].execution_id


async def test_a_step_knows_its_workflow_name_and_version(api: Any) -> None:
    """The relay builds StepReady from the contract: StepContext.workflow and workflow_version are set."""
    _, client = api
    text = "name: who\nsteps: [{id: me, type: python, with: {callable: 'tests.integration.steps:whoami'}}]\n"
    for _ in range(2):  # version 2: a changed definition
        r = await client.post("/v1/workflows", content=text, headers={"content-type": "application/yaml"})
        assert r.status_code == 201, r.text
        text = text.replace("[{id: me", "[{id: me2, type: noop}, {id: me")
    started = await client.post("/v1/executions", json={"workflow": "who", "input": {}})
    done = await finished(client, started.json()["id"])
    assert done["status"] == "completed", done
    me = next(s for s in done["steps"] if s["step_id"] == "me")
    assert me["output"] == {"workflow": "who", "workflow_version": 2, "step_id": "me"}


async def test_concurrent_batches_and_single_starts_with_overlapping_keys_start_each_key_once(api: Any) -> None:
    running, client = api
    keys = [f"o-{n}" for n in range(30)]

    async def batch(offset: int) -> Any:
        items = [{"workflow": "echo", "input": {"msg": k}, "idempotency_key": k} for k in keys[offset:] + keys[:offset]]
        return await client.post("/v1/executions:batch", json={"items": items})

    async def single(k: str) -> Any:
        return await client.post("/v1/executions", json={"workflow": "echo", "input": {"msg": k}},
                                 headers={"Idempotency-Key": k})

    answers = await asyncio.gather(*(batch(o) for o in (0, 7, 19)), *(single(k) for k in keys[::3]))
    ids: dict[str, set[str]] = {}
    created = 0
    for r in answers[:3]:
        assert r.status_code == 200, r.text
        for item in r.json()["items"]:
            assert item["status"] in (200, 201), item
            ids.setdefault(item["idempotency_key"], set()).add(item["execution_id"])
            created += item["status"] == 201
    for k, r in zip(keys[::3], answers[3:]):
        assert r.status_code in (200, 201), r.text
        ids[k].add(r.json()["id"])
        created += r.status_code == 201
    assert all(len(v) == 1 for v in ids.values()) and len(ids) == 30
    assert created == 30 and executions_stored(running) == 30
