"""CloudEvents from the official SDK (cloudevents 2.x) as the producer, against a real gateway
over real HTTP and a real NATS: structured, binary and batch mode on `POST /v1/triggers`,
binary and structured mode on the trigger topic, exactly one execution per (source, id)
whichever mode repeats it, hostile input refused naming the field and the limit, invalid
and unroutable events in the dead-letter store, and `GET /v1/triggers/types`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import orjson
import pytest
from cloudevents.core.bindings import http as sdk_http
from cloudevents.core.v1.event import CloudEvent as SdkEvent

import weft
from contracts.subjects import trigger_subject
from contracts.triggers import trigger_stream
from services.broker import OutMessage
from services.gateway.keys import Keys
from services.triggers.ingest import trigger_execution_id
from tests.support import Running, stack_up, wait_until

pytestmark = pytest.mark.integration
PARTS = ("orchestrator", "relay", "worker", "projector", "deadletters", "triggers", "gateway")

ECHO = """
name: echo
on: [{event: echo.requested}]
input_schema: {type: object, required: [msg], properties: {msg: {type: string}}}
steps:
  - {id: say, type: transform, with: {expression: "msg"}, input: {msg: "${{ input.msg }}"}}
output: "${{ steps.say.output }}"
"""
AUDIT = """
name: audit
on: [{event: echo.requested, filter: {source: audited}}, {event: audit.done}]
steps: [{id: a, type: noop}]
"""


class Api:
    def __init__(self, running: Running, client: httpx.AsyncClient):
        self.running, self.client, self.store = running, client, running.stack.store

    def publish(self, text: str) -> None:
        self.running.publish(text)

    async def send(self, message: Any, **headers: str) -> httpx.Response:
        return await self.client.post("/v1/triggers", content=message.body, headers={**message.headers, **headers})

    async def batch(self, events: list[Any]) -> httpx.Response:
        return await self.client.post("/v1/triggers", content=orjson.dumps(events),
                                      headers={"content-type": "application/cloudevents-batch+json"})

    async def output(self, workflow: str, source: str, event_id: str) -> Any:
        eid = trigger_execution_id(workflow, source, event_id)

        async def done() -> Any:
            r = await self.client.get(f"/v1/executions/{eid}")
            return r.json() if r.status_code == 200 and r.json()["status"] == "completed" else None

        return (await wait_until(done, timeout=20, what=f"{workflow} for {source}:{event_id}"))["output"]

    async def executions(self, workflow: str) -> Any:
        return (await self.client.get("/v1/executions", params={"workflow": workflow})).json()["items"]

    async def letters(self, n: int, kind: str) -> Any:
        async def enough() -> Any:
            items = (await self.client.get("/v1/deadletters", params={"kind": kind})).json()["items"]
            return items if len(items) >= n else None

        return await wait_until(enough, timeout=20, what=f"{n} {kind} dead letters")


async def _api(tmp_path: Path, db_url: str, nats_url: str) -> AsyncIterator[Api]:
    # A 4 MiB payload maximum: the refusals over it stay quick to send.
    async with stack_up(tmp_path, db_url, nats_url, parts=PARTS, payload_max=4 * 1024 * 1024) as running:
        token, _ = await asyncio.to_thread(Keys(running.stack.store).create, ["admin"])
        async with httpx.AsyncClient(base_url=running.stack.gateway.url, timeout=30,
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            api = Api(running, client)
            api.publish(ECHO)
            yield api


@pytest.fixture
async def api(tmp_path: Path, sqlite_url: str, nats_url: str) -> AsyncIterator[Api]:
    async for a in _api(tmp_path, sqlite_url, nats_url):
        yield a


@pytest.fixture
async def api_on_both(tmp_path: Path, db_url: str, nats_url: str) -> AsyncIterator[Api]:
    async for a in _api(tmp_path, db_url, nats_url):
        yield a


def event(event_id: str, data: Any = None, **attrs: Any) -> SdkEvent:
    return SdkEvent({"type": "echo.requested", "source": "sdk-tests", "id": event_id, **attrs},
                    data if data is not None else {"msg": f"hello {event_id}"})


def structured(e: SdkEvent) -> Any:
    """One event as an item of a batch: the SDK's structured JSON of it."""
    return orjson.loads(sdk_http.to_structured_event(e).body)


async def test_structured_and_binary_mode_from_the_sdk_start_executions(api: Api) -> None:
    r = await api.send(sdk_http.to_structured_event(event("s-1")))
    assert r.status_code == 202, r.text
    assert r.json() == {"id": "s-1", "source": "sdk-tests", "type": "echo.requested",
                        "topic": "weft.triggers.echo.requested", "duplicate": False}
    binary = sdk_http.to_binary_event(event("b-1", subject="orders/1", tenant="acme"))
    assert "ce-id" in binary.headers  # what Knative sends: attributes in headers, the data is the body
    r = await api.send(binary)
    assert r.status_code == 202 and r.json()["id"] == "b-1", r.text
    assert await api.output("echo", "sdk-tests", "s-1") == "hello s-1"
    assert await api.output("echo", "sdk-tests", "b-1") == "hello b-1"
    [record] = await asyncio.to_thread(api.store.load, trigger_stream("sdk-tests", "b-1"))
    kept = orjson.loads(record.data)["event"]
    assert kept["subject"] == "orders/1" and kept["tenant"] == "acme" and kept["data"] == {"msg": "hello b-1"}
    # A type nobody subscribes to is accepted (its topic is open) and lands in the dead-letter store.
    nobody = await api.send(sdk_http.to_binary_event(event("u-1", type="nobody.listens")))
    assert nobody.status_code == 202, nobody.text
    [letter] = await api.letters(1, "trigger_unroutable")
    assert "no workflow subscribes to event type 'nobody.listens'" in letter["reason"]


async def test_the_same_source_and_id_in_every_mode_starts_one_execution(api_on_both: Api) -> None:
    api = api_on_both
    e = event("dup-1")
    answers = [await api.send(sdk_http.to_binary_event(e)), await api.send(sdk_http.to_binary_event(e)),
               await api.send(sdk_http.to_structured_event(e)), await api.batch([structured(e), structured(e)])]
    assert [a.status_code for a in answers] == [202, 202, 202, 202], [a.text for a in answers]
    assert [a.json()["duplicate"] for a in answers[:3]] == [False, True, True]
    assert [i["duplicate"] for i in answers[3].json()["items"]] == [True, True]
    # Beyond the broker's dedup window the trigger log catches it: a republish under another message id.
    transport = api.running.stack.transport
    raw = sdk_http.to_binary_event(e)
    await transport.publish(OutMessage(trigger_subject("echo.requested"), raw.body, msg_id="later-1",
                                       headers=dict(raw.headers)))
    assert await api.output("echo", "sdk-tests", "dup-1") == "hello dup-1"
    await wait_until(lambda: api.running.stack.triggers.handled >= 2, timeout=20, what="both deliveries")

    async def listed() -> Any:  # the list is a projection: it may trail the execution by a moment
        items = await api.executions("echo")
        return items or None

    assert len(await wait_until(listed, timeout=20, what="the execution listed")) == 1


async def test_a_batch_is_answered_per_event_and_refused_whole_over_the_limit(api: Api) -> None:
    api.publish(AUDIT)
    good = [structured(event(f"batch-{n}")) for n in range(3)]
    missing_source = {k: v for k, v in structured(event("no-source")).items() if k != "source"}
    wrong_version = {**structured(event("old")), "specversion": "0.3"}
    r = await api.batch([good[0], missing_source, good[1], wrong_version, good[2]])
    assert r.status_code == 207, r.text
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (3, 2)
    assert [i["status"] for i in body["items"]] == [202, 422, 202, 422, 202]
    assert body["items"][1]["error"]["problems"][0]["field"] == "body[1].source"
    assert body["items"][3]["error"]["problems"][0]["field"] == "body[3].specversion"
    for n in range(3):
        assert await api.output("echo", "sdk-tests", f"batch-{n}") == f"hello batch-{n}"
    everything = await api.batch([structured(event("all-1")), structured(event("all-2"))])
    assert everything.status_code == 202 and everything.json()["accepted"] == 2
    # Over the limit, not an array, or nothing valid: refused whole, nothing published.
    over = await api.batch([structured(event(f"over-{n}")) for n in range(1001)])
    assert over.status_code == 422 and "1001 events, over the limit of 1000" in over.json()["error"]["message"]
    none_valid = await api.batch([missing_source, wrong_version])
    assert none_valid.status_code == 422, none_valid.text
    assert [p["field"] for p in none_valid.json()["error"]["problems"]] == ["body[0].source", "body[1].specversion"]
    # A key bound to `audit` may publish its types only; data over the payload maximum is refused per event.
    token, _ = await asyncio.to_thread(Keys(api.store).create, ["trigger"], workflows=["audit"])
    audit = structured(event("a-1", type="audit.done"))
    big = structured(event("big-1", {"msg": "x" * (4 * 1024 * 1024)}))
    mixed = await api.client.post("/v1/triggers", content=orjson.dumps([audit, structured(event("nope-1")), big]),
                                  headers={"content-type": "application/cloudevents-batch+json",
                                           "Authorization": f"Bearer {token}"})
    assert mixed.status_code == 207 and [i["status"] for i in mixed.json()["items"]] == [202, 403, 403], mixed.text
    sized = await api.batch([big, structured(event("small-1"))])
    assert [i["status"] for i in sized.json()["items"]] == [413, 202], sized.text
    assert "over the limit of 4194304 bytes" in sized.json()["items"][0]["error"]["message"]
    await wait_until(lambda: _at_least(api, "echo", 6), timeout=20, what="6 executions")
    await asyncio.sleep(1.0)  # time for anything wrongly published to be ingested
    for n in (0, 500, 1000):
        assert await asyncio.to_thread(api.store.load, trigger_stream("sdk-tests", f"over-{n}")) == []
    assert len(await api.executions("echo")) == 6
    assert await asyncio.to_thread(api.store.load, trigger_stream("sdk-tests", "big-1")) == []


async def _at_least(api: Api, workflow: str, n: int) -> bool:
    return len(await api.executions(workflow)) >= n


async def test_hostile_binary_requests_name_the_header_or_field_and_the_limit(api: Api) -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "h-1", "ce-source": "s", "ce-type": "echo.requested",
               "content-type": "application/json"}
    bad_utf8 = await api.client.post("/v1/triggers", content=b"{}",
                                     headers=[(k.encode(), v.encode()) for k, v in headers.items() if k != "ce-source"]
                                     + [(b"ce-source", b"caf\xe9")])
    assert bad_utf8.status_code == 422 and bad_utf8.json()["error"]["problems"][0]["field"] == "headers.ce-source"
    assert "not UTF-8" in bad_utf8.json()["error"]["message"]
    deep = await api.client.post("/v1/triggers", content=b"[" * 10_000 + b"]" * 10_000, headers=headers)
    assert deep.status_code == 422 and "nested deeper than 100 levels" in deep.json()["error"]["message"]
    missing = await api.client.post("/v1/triggers", content=b"{}", headers={k: v for k, v in headers.items()
                                                                           if k != "ce-id"})
    assert missing.status_code == 422 and missing.json()["error"]["problems"][0]["field"] == "headers.ce-id"
    old = await api.client.post("/v1/triggers", content=b"{}", headers={**headers, "ce-specversion": "0.3"})
    assert old.status_code == 422 and "must be '1.0'" in old.json()["error"]["message"]
    avro = await api.client.post("/v1/triggers", content=b"x", headers={"content-type": "application/cloudevents+avro"})
    assert avro.status_code == 415
    limit = api.running.stack.executions.claims.limits.maximum
    huge = await api.client.post("/v1/triggers", content=b'{"msg": "' + b"x" * (limit + 10) + b'"}', headers=headers)
    assert huge.status_code == 413 and str(limit) in huge.json()["error"]["message"]
    assert await asyncio.to_thread(api.store.load, trigger_stream("s", "h-1")) == []


async def test_nats_binary_and_structured_mode_and_dead_letters(api: Api) -> None:
    transport = api.running.stack.transport
    topic = trigger_subject("echo.requested")
    binary = sdk_http.to_binary_event(event("n-bin", datacontenttype="application/json"))
    await transport.publish(OutMessage(topic, binary.body, msg_id="n-bin", headers=dict(binary.headers)))
    plain = sdk_http.to_structured_event(event("n-str"))
    await transport.publish(OutMessage(topic, plain.body, msg_id="n-str", headers=dict(plain.headers)))
    assert await api.output("echo", "sdk-tests", "n-bin") == "hello n-bin"
    assert await api.output("echo", "sdk-tests", "n-str") == "hello n-str"
    # Invalid (no ce-source) and unroutable binary events land in the dead-letter store with their reason.
    no_source = {k: v for k, v in binary.headers.items() if k != "ce-source"}
    await transport.publish(OutMessage(topic, binary.body, msg_id="n-bad", headers={**no_source, "ce-id": "n-bad"}))
    nobody = sdk_http.to_binary_event(event("n-none", type="nobody.listens"))
    await transport.publish(OutMessage(trigger_subject("nobody.listens"), nobody.body, msg_id="n-none",
                                       headers=dict(nobody.headers)))
    [invalid] = await api.letters(1, "trigger_invalid")
    assert "binary mode" in invalid["reason"] and "headers.ce-source: Field required" in invalid["reason"]
    [unroutable] = await api.letters(1, "trigger_unroutable")
    assert "nobody.listens" in unroutable["reason"]


async def test_trigger_types_lists_subscribed_types_with_workflows_and_schemas(api: Api) -> None:
    api.publish(AUDIT)
    r = await api.client.get("/v1/triggers/types")
    assert r.status_code == 200, r.text
    types = {t["type"]: t for t in r.json()["items"]}
    assert sorted(types) == ["audit.done", "echo.requested"]
    echo = types["echo.requested"]
    assert echo["topic"] == "weft.triggers.echo.requested"
    by_name = {w["name"]: w for w in echo["workflows"]}
    assert by_name["echo"]["version"] == 1 and by_name["echo"]["input_schema"]["required"] == ["msg"]
    assert by_name["echo"]["filters"] == [] and by_name["audit"]["filters"] == [{"source": "audited"}]
    assert types["audit.done"]["workflows"][0]["input_schema"] is None
    # A key bound to a workflow sees only it, and the types it subscribes to; no key at all: 401.
    token, _ = await asyncio.to_thread(Keys(api.store).create, ["read"], workflows=["audit"])
    bound = await api.client.get("/v1/triggers/types", headers={"Authorization": f"Bearer {token}"})
    assert [(t["type"], [w["name"] for w in t["workflows"]]) for t in bound.json()["items"]] == [
        ("audit.done", ["audit"]), ("echo.requested", ["audit"])]
    async with httpx.AsyncClient(base_url=api.running.stack.gateway.url) as anonymous:
        assert (await anonymous.get("/v1/triggers/types")).status_code == 401


async def test_the_client_and_the_cli_list_trigger_types(api: Api) -> None:
    token, _ = await asyncio.to_thread(Keys(api.store).create, ["read"])
    async with weft.AsyncClient(api.running.stack.gateway.url, api_key=token) as client:
        listed = await client.trigger_types()
    [echo] = listed.items
    assert echo.type == "echo.requested" and [(w.name, w.version) for w in echo.workflows] == [("echo", 1)]
    assert echo.workflows[0].input_schema is not None and echo.workflows[0].input_schema["required"] == ["msg"]

    def with_the_sync_client() -> Any:
        with weft.Client(api.running.stack.gateway.url, api_key=token) as sync_client:
            return sync_client.trigger_types()

    sync = await asyncio.to_thread(with_the_sync_client)
    assert sync == listed
    env = {"PATH": "/usr/bin:/bin", "WEFT_DATABASE_URL": api.running.stack.settings.database_url}
    done = await asyncio.to_thread(_weft, env, "trigger-types", "--json")
    assert done.returncode == 0, done.stderr
    [row] = orjson.loads(done.stdout)
    assert row["id"] == row["type"] == "echo.requested" and row["workflows"][0]["input_schema"]["required"] == ["msg"]
    human = await asyncio.to_thread(_weft, {**env, "COLUMNS": "200"}, "trigger-types")
    assert human.returncode == 0 and "echo@1" in human.stdout and "msg" in human.stdout, human.stdout + human.stderr


def _weft(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weft", *args], capture_output=True, text=True, env=env, timeout=60)
