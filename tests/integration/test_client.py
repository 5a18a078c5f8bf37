"""weft.Client and weft.AsyncClient against a real gateway (real NATS, real PostgreSQL, real HTTP):
start/wait over SSE, idempotency, paging, control, replay, triggers, dead letters, and every typed error."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest

import weft
from examples.orders import OrderIn, orders
from services.gateway.keys import Keys
from tests.pg_cluster import pg_cluster  # noqa: F401 - the fixture
from tests.support import Running, stack_up
from weft.client import (AsyncClient, Client, Conflict, Forbidden, InvalidRequest, NotFound, TooLarge,
                         Unauthorized, Unavailable, WaitTimeout)

pytestmark = pytest.mark.integration
PARTS = ("orchestrator", "relay", "worker", "projector", "deadletters", "triggers", "gateway")

SLOW = """
name: slow-client
steps:
  - {id: a, type: sleep, with: {seconds: 30}}
"""
BROKEN = """
name: broken-client
steps:
  - id: boom
    type: python
    with: {callable: "tests.integration.test_client:boom"}
    retry: {max_attempts: 1}
"""


def boom(input: Any, ctx: Any) -> Any:
    if not input.get("fixed"):
        raise RuntimeError("boom")
    return "ok"


class World:
    def __init__(self, running: Running, tokens: dict[str, str]):
        self.running, self.tokens = running, tokens
        self.url = running.stack.gateway.url

    def client(self, who: str | None = "admin", **kw: Any) -> AsyncClient:
        return AsyncClient(self.url, api_key=self.tokens.get(who or "") or "", **kw)


@pytest.fixture
async def world(tmp_path: Path, pg_url: str, nats_url: str) -> AsyncIterator[World]:
    async with stack_up(tmp_path, pg_url, nats_url, parts=PARTS, gateway_max_body=200_000) as running:
        keys = Keys(running.stack.store)
        tokens = {scope: (await asyncio.to_thread(keys.create, [scope]))[0] for scope in ("admin", "read", "trigger")}
        yield World(running, tokens)


async def test_start_wait_and_read_back_the_code_first_order(world: World) -> None:
    async with world.client() as c:
        published = await c.publish_workflow(orders)
        assert published.workflow == "orders" and published.content_hash == orders.content_hash()
        run = await c.start("orders", {"order_id": "A-1", "items": ["book", "lamp"]}, idempotency_key="A-1")
        assert run.created is True
        result = await run.wait(timeout=30)
        assert result.status == "completed" and result.error is None
        assert result.output == {"order": "A-1", "summary": {"parcels": ["P0-1", "P1-2"], "count": 2}}
        again = await c.start("orders", {"order_id": "A-1", "items": ["book", "lamp"]}, idempotency_key="A-1")
        assert again.id == run.id and again.created is False
        history = await asyncio.to_thread(_sync_history, world, run.id)
        assert history[0] == "ExecutionStarted" and history[-1] == "ExecutionCompleted"


def _sync_history(world: World, execution_id: str) -> list[str]:
    with Client(world.url, api_key=world.tokens["read"]) as c:
        assert c.wait(execution_id, timeout=10).status == "completed"  # the sync client's SSE wait
        return [e.type for e in c.history(execution_id)]


async def test_sync_client_start_wait_list_pages_and_control(world: World) -> None:
    def scenario() -> None:
        with weft.Client(world.url, api_key=world.tokens["admin"]) as c:
            c.publish_workflow(SLOW)
            c.publish_workflow(orders)
            ids = [c.start("orders", {"order_id": f"B-{i}"}).id for i in range(2)]
            ids.append(c.start(orders, OrderIn(order_id="B-2", items=["x"])).id)  # a Workflow and a model
            for eid in ids:
                assert c.wait(eid, timeout=30).status == "completed"
            listed = list(c.iter_executions(workflow="orders", limit=2))  # two pages
            assert {row.execution_id for row in listed} == set(ids)
            slow = c.start("slow-client")
            with pytest.raises(WaitTimeout):
                slow.wait(timeout=0.5)
            assert c.pause(slow.id).status == "paused"
            assert c.resume(slow.id, why="go on").status == "running"
            assert slow.cancel(why="enough").status == "cancelled"
            assert c.wait(slow.id, timeout=5).status == "cancelled"

    await asyncio.to_thread(scenario)


async def test_retry_replay_trigger_and_dead_letters(world: World) -> None:
    async with world.client() as c:
        await c.publish_workflow(BROKEN)
        run = await c.start("broken-client", {"fixed": False})
        failed = await run.wait(timeout=30)
        assert failed.status == "failed" and failed.error is not None and failed.error.type == "RuntimeError"

        async def dead_letter() -> Any:
            page = await c.dead_letters(workflow="broken-client")
            return page.items or None

        from tests.support import wait_until

        items = await wait_until(dead_letter, timeout=20, what="the dead letter")
        detail = await c.dead_letter(items[0].id)
        assert detail.execution_id == run.id and detail.step_id == "boom"
        done = await c.reprocess([items[0].id], patch={"fixed": True}, why="fixed the input")
        assert done.ok and done.outcomes[0].outcome == "reprocessed"
        assert (await run.wait(timeout=30)).status == "completed"
        assert [e.type for e in await c.history(run.id)][-1] == "ExecutionCompleted"

        async def reprocessed_counted() -> bool:
            return (await c.dead_letter_stats()).by_status.get("reprocessed", 0) >= 1

        await wait_until(reprocessed_counted, timeout=20, what="the reprocessed dead letter in the stats")
        assert (await c.workflow("broken-client")).version == 1
        assert "broken-client" in {w.workflow for w in (await c.workflows()).items}

        replayed = await c.replay(run.id, input_patch={"fixed": True}, idempotency_key="r1")
        assert replayed["execution_id"] != run.id
        assert (await c.wait(replayed["execution_id"], timeout=30)).status == "completed"
        trig = await c.publish("order.placed", {"order_id": "T-1"}, id="evt-1", source="tests")
        again = await c.publish("order.placed", {"order_id": "T-1"}, id="evt-1", source="tests")
        assert trig.duplicate is False and again.duplicate is True
        with pytest.raises(InvalidRequest):
            await c.discard([items[0].id], reason=" ")


async def test_typed_errors_carry_code_message_and_problems(world: World) -> None:
    async with world.client() as admin:
        await admin.publish_workflow(orders)
        with pytest.raises(NotFound) as nf:
            await admin.get(str(uuid.uuid4()))
        assert nf.value.status == 404 and nf.value.code == "not_found"
        with pytest.raises(NotFound):  # an id cannot walk to another route
            await admin.get("x/../../keys")
        with pytest.raises(ValueError, match="not an id"):
            await admin.get("..")
        with pytest.raises(InvalidRequest) as bad:
            await admin.start("orders", {"items": ["x"]})
        assert bad.value.status == 422 and bad.value.code == "invalid"
        assert any("order_id" in p.message or "order_id" in p.field for p in bad.value.problems)
        await admin.start("orders", {"order_id": "C-1"}, idempotency_key="C-1")
        with pytest.raises(Conflict) as conflict:
            await admin.start("orders", {"order_id": "C-2"}, idempotency_key="C-1")
        assert conflict.value.status == 409 and conflict.value.code == "idempotency_conflict"
        with pytest.raises(TooLarge) as large:
            await admin.publish_workflow("name: huge\ndescription: " + "x" * 300_000 + "\nsteps: []\n")
        assert large.value.status == 413 and large.value.code == "too_large"
    async with world.client(None) as anonymous:
        with pytest.raises(Unauthorized) as unauth:
            await anonymous.list()
        assert unauth.value.status == 401 and unauth.value.code == "unauthorized" and unauth.value.message
    async with world.client("read") as reader:
        with pytest.raises(Forbidden) as forbidden:
            await reader.start("orders", {"order_id": "D-1"})
        assert forbidden.value.status == 403 and forbidden.value.code == "forbidden"


class Counting(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return await super().handle_async_request(request)


BROKEN_HOOK = """
name: hooked-client
on:
  - webhook: {path: /client-broken, secret_env: WEFT_TEST_CLIENT_NOT_SET}
steps:
  - {id: a, type: noop}
"""


async def test_503_is_retried_with_backoff_then_raised(world: World) -> None:
    # A webhook whose secret the gateway lacks answers 503 (unavailable): a real 503 of a real gateway.
    async with world.client() as admin:
        await admin.publish_workflow(BROKEN_HOOK)
    counting = Counting()
    async with AsyncClient(world.url, api_key="", max_retries=2, backoff=0.3, transport=counting) as c:
        began = time.monotonic()
        with pytest.raises(Unavailable) as down:
            await c.request("POST", "/v1/webhooks/client-broken", json={},
                            headers={"X-Weft-Signature": "sha256=00"})
        took = time.monotonic() - began
    assert down.value.status == 503 and down.value.code == "unavailable" and down.value.message
    assert counting.calls == 3  # the first try and two retries
    assert took >= (0.3 + 0.6) / 2  # the backoff waited (with jitter: at least half of each delay)


async def test_503_while_the_store_is_down_honours_retry_after_and_recovers(
    tmp_path: Path, nats_url: str, pg_cluster: Any  # noqa: F811
) -> None:
    # The gateway answers 503 with Retry-After: 1 while its PostgreSQL is stopped (our own cluster).
    async with stack_up(tmp_path, pg_cluster.url, nats_url, parts=["gateway", "projector"]) as running:
        token, _ = await asyncio.to_thread(Keys(running.stack.store).create, ["admin"])
        url = running.stack.gateway.url
        async with AsyncClient(url, api_key=token) as c:
            assert (await c.list()).items == []
        await asyncio.to_thread(pg_cluster.stop)
        counting = Counting()
        async with AsyncClient(url, api_key=token, max_retries=1, transport=counting) as c:
            began = time.monotonic()
            with pytest.raises(Unavailable) as down:
                await c.list()
            took = time.monotonic() - began
        assert down.value.status == 503 and down.value.code == "unavailable" and down.value.retry_after == 1.0
        assert counting.calls == 2 and took >= 1.0  # it waited the Retry-After second before its retry

        async def back_soon() -> None:
            await asyncio.sleep(1.5)
            await asyncio.to_thread(pg_cluster.start)

        restart = asyncio.create_task(back_soon())
        counting = Counting()
        async with AsyncClient(url, api_key=token, max_retries=30, transport=counting) as c:
            page = await c.list()  # 503s while it is down, then the answer
        await restart
        assert page.items == [] and counting.calls >= 2
