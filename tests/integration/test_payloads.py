"""The payload policy against a real stack (NATS + SQLite and PostgreSQL): big inputs, outputs and triggers
go by reference and complete; over the maximum is refused (413, exit 2) or fails the step
with PayloadTooLarge; nothing stalls, and a normal execution completes right after."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import orjson
import pytest

from contracts.payloads import MIB, REF_KEY
from services.store.blobs import SqlBlobStore
from tests.support import ROOT, Running, stack_up, wait_until

BIG = """
name: big
steps:
  - id: make
    type: python
    with: {callable: "tests.integration.payload_steps:make"}
    input: {size: "${{ input.size }}"}
  - id: use
    type: python
    needs: [make]
    with: {callable: "tests.integration.payload_steps:count"}
    input: {data: "${{ steps.make.output }}"}
output: "${{ steps.use.output }}"
"""

TAKE = """
name: take
steps:
  - id: count
    type: python
    with: {callable: "tests.integration.payload_steps:count"}
output: "${{ steps.count.output }}"
"""

PEEK = """
name: peek
steps:
  - id: make
    type: python
    with: {callable: "tests.integration.payload_steps:make"}
    input: {size: "${{ input.size }}"}
  - id: use
    type: python
    needs: [make]
    with: {callable: "tests.integration.payload_steps:count"}
    input: {tag: "${{ steps.make.output.tag }}"}
"""

ECHO = """
name: small
steps:
  - id: a
    type: python
    with: {callable: "tests.integration.payload_steps:count"}
output: "${{ steps.a.output.bytes }}"
"""

ON_TRIGGER = """
name: on-big-trigger
on:
  - event: big.arrived
steps:
  - id: count
    type: python
    with: {callable: "tests.integration.payload_steps:count"}
output: "${{ steps.count.output }}"
"""

PARTS = ("orchestrator", "relay", "worker", "projector", "deadletters", "triggers", "gateway")
MAX = 8 * MIB  # a small hard maximum keeps the over-the-limit cases quick


class Api:
    def __init__(self, running: Running, client: httpx.AsyncClient):
        self.running, self.client = running, client

    async def publish(self, text: str) -> None:
        r = await self.client.post("/v1/workflows", content=text, headers={"content-type": "application/yaml"})
        assert r.status_code in (200, 201), r.text

    async def finished(self, eid: str, timeout: float = 30) -> dict[str, Any]:
        async def done() -> Any:
            body = (await self.client.get(f"/v1/executions/{eid}")).json()
            return body if body["status"] in ("completed", "failed", "cancelled") else None

        return await wait_until(done, timeout=timeout, what=f"{eid} to finish")

    async def normal_run_completes(self) -> None:
        """After whatever came before, a small execution still completes within seconds."""
        await self.publish(ECHO)
        started = time.monotonic()
        r = await self.client.post("/v1/executions", json={"workflow": "small", "input": {"k": 1}})
        assert r.status_code == 201, r.text
        body = await self.finished(r.json()["id"], timeout=10)
        assert body["status"] == "completed" and body["output"] == 7
        assert time.monotonic() - started < 10


@pytest.fixture
async def api(tmp_path: Path, db_url: str, nats_url: str) -> AsyncIterator[Api]:
    """The whole stack on SQLite and on PostgreSQL (the blob store lives in either)."""
    async with stack_up(tmp_path, db_url, nats_url, parts=PARTS, payload_max=MAX, gateway_auth=False) as running:
        async with httpx.AsyncClient(base_url=running.stack.gateway.url, timeout=60) as client:
            yield Api(running, client)


def _event_data(running: Running, eid: str, type_: str, step: str | None = None) -> list[Any]:
    return [e for e in running.reader.history(eid) if e.type == type_ and (step is None or e.step_id == step)]


async def test_a_step_output_over_1_mib_goes_by_reference_and_the_next_step_sees_it_plain(api: Api) -> None:
    await api.publish(BIG)
    r = await api.client.post("/v1/executions", json={"workflow": "big", "input": {"size": 3 * MIB}})
    assert r.status_code == 201, r.text
    body = await api.finished(r.json()["id"])
    assert body["status"] == "completed", body
    assert body["output"]["bytes"] > 3 * MIB  # the whole value reached the second step
    [made] = await asyncio.to_thread(_event_data, api.running, body["id"], "StepSucceeded", "make")
    ref = made.output
    assert set(ref) == {REF_KEY, "size"} and ref["size"] > 3 * MIB
    blob = await asyncio.to_thread(SqlBlobStore(api.running.stack.store).get, ref[REF_KEY])
    assert orjson.loads(blob)["blob"] == "x" * (3 * MIB)
    [scheduled] = await asyncio.to_thread(_event_data, api.running, body["id"], "StepScheduled", "use")
    assert scheduled.input == {"data": ref}  # passed on whole, as a reference
    await api.normal_run_completes()


async def test_a_2_mib_input_over_http_is_stored_by_reference_and_completes(api: Api) -> None:
    await api.publish(TAKE)
    data = {"items": ["y" * 1000] * 2100}  # ~2 MiB
    r = await api.client.post("/v1/executions", json={"workflow": "take", "input": data})
    assert r.status_code == 201, r.text
    assert r.json()["input"][REF_KEY]  # what is stored is the reference
    body = await api.finished(r.json()["id"])
    assert body["status"] == "completed" and body["output"]["bytes"] == len(orjson.dumps(data))
    # Repeating the request with its Idempotency-Key compares the value, not the reference.
    first = await api.client.post("/v1/executions", json={"workflow": "take", "input": data},
                                  headers={"Idempotency-Key": "k1"})
    again = await api.client.post("/v1/executions", json={"workflow": "take", "input": data},
                                  headers={"Idempotency-Key": "k1"})
    assert (first.status_code, again.status_code) == (201, 200) and first.json()["id"] == again.json()["id"]
    await api.normal_run_completes()


async def test_over_the_maximum_is_413_naming_limit_and_size_and_nothing_is_stored(api: Api) -> None:
    await api.publish(TAKE)
    before = api.running.stack.store.head()
    data = {"blob": "z" * (MAX + 10)}
    r = await api.client.post("/v1/executions", json={"workflow": "take", "input": data})
    assert r.status_code == 413, r.text
    message = r.json()["error"]["message"]
    assert str(MAX) in message and str(len(orjson.dumps(data))) in message and "WEFT_PAYLOAD_MAX" in message
    huge = await api.client.post("/v1/executions", content=b'{"workflow": "take", "input": "' + b"q" * (3 * MAX) + b'"}',
                                 headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "over the limit" in huge.json()["error"]["message"]
    trig = await api.client.post("/v1/triggers", json={"type": "big.arrived", "data": data})
    assert trig.status_code == 413 and str(MAX) in trig.json()["error"]["message"]
    forged = await api.client.post("/v1/executions", json={"workflow": "take", "input": {REF_KEY: "0" * 64}})
    assert forged.status_code == 422 and "reserves" in forged.json()["error"]["message"]
    assert api.running.stack.store.head() == before  # nothing stored
    await api.normal_run_completes()


async def test_an_output_over_the_maximum_fails_non_retryably_with_payload_too_large(api: Api) -> None:
    await api.publish(BIG)
    r = await api.client.post("/v1/executions", json={"workflow": "big", "input": {"size": MAX + 1}})
    body = await api.finished(r.json()["id"])
    assert body["status"] == "failed", body
    failed = await asyncio.to_thread(_event_data, api.running, body["id"], "StepFailed")
    assert [(f.error_type, f.attempt, f.retryable) for f in failed] == [("PayloadTooLarge", 1, False)]
    assert str(MAX) in failed[0].error_message
    [letter] = await asyncio.to_thread(_event_data, api.running, body["id"], "StepDeadLettered")
    assert letter.error_type == "PayloadTooLarge" and "non-retryable" in letter.reason

    async def listed() -> Any:
        rows = (await api.client.get("/v1/deadletters", params={"execution_id": body["id"]})).json()["items"]
        return rows or None

    [row] = await wait_until(listed, timeout=10)
    assert row["error_type"] == "PayloadTooLarge"
    await api.normal_run_completes()


async def test_an_expression_looking_inside_a_reference_fails_the_step_saying_why(api: Api) -> None:
    await api.publish(PEEK)
    r = await api.client.post("/v1/executions", json={"workflow": "peek", "input": {"size": MIB}})
    body = await api.finished(r.json()["id"])
    assert body["status"] == "failed"
    [letter] = await asyncio.to_thread(_event_data, api.running, body["id"], "StepDeadLettered")
    assert letter.error_type == "ExpressionError" and "stored by reference" in letter.error_message
    await api.normal_run_completes()


async def test_a_1_mib_trigger_goes_by_reference_and_its_execution_completes(api: Api) -> None:
    await api.publish(ON_TRIGGER)
    data = {"rows": ["r" * 100] * 10_500}  # ~1.1 MiB: over the broker's max_payload inline
    r = await api.client.post("/v1/triggers", json={"type": "big.arrived", "id": "t-1", "data": data})
    assert r.status_code == 202, r.text

    async def started() -> Any:
        rows = (await api.client.get("/v1/executions", params={"workflow": "on-big-trigger"})).json()["items"]
        return rows or None

    [row] = await wait_until(started, timeout=15)
    body = await api.finished(row["id"])
    assert body["status"] == "completed" and body["output"]["bytes"] == len(orjson.dumps(data))
    assert (await api.client.get("/readyz")).status_code == 200  # the broker connection is fine
    await api.normal_run_completes()


async def test_an_oversized_dead_letter_keeps_a_preview_and_its_bytes(api: Api) -> None:
    transport = api.running.stack.transport
    payload = b'{"junk": "' + b"j" * (600 * 1024) + b'"}'
    await transport.dead_letter("poison", payload, reason="undecodable", source_subject="weft.results.x",
                                msg_id="dlq:test:oversized")

    async def recorded() -> Any:
        rows = (await api.client.get("/v1/deadletters", params={"kind": "poison"})).json()["items"]
        return rows or None

    [row] = await wait_until(recorded, timeout=15)
    shown = (await api.client.get(f"/v1/deadletters/{row['id']}")).json()
    headers = shown["headers"]
    assert headers["Weft-Payload-Size"] == str(len(payload)) and headers["Weft-Payload-Truncated"] == "stored"
    assert len(str(shown["payload"])) <= 16 * 1024
    whole = await asyncio.to_thread(SqlBlobStore(api.running.stack.store).get, headers["Weft-Payload-Sha256"])
    assert whole == payload
    await api.normal_run_completes()


def test_weft_run_with_a_2_mib_input_file_and_over_the_maximum(tmp_path: Path, sqlite_url: str, nats_url: str) -> None:
    wf = tmp_path / "take.yaml"
    wf.write_text(TAKE)
    big = tmp_path / "big.json"
    data = {"items": ["y" * 1000] * 2100}
    big.write_bytes(orjson.dumps(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    env.update(WEFT_HOME=str(tmp_path), WEFT_DATABASE_URL=sqlite_url, WEFT_NATS_URL=nats_url, PYTHONPATH=str(ROOT))

    async def main() -> None:
        async with stack_up(tmp_path, sqlite_url, nats_url, parts=("orchestrator", "relay", "worker")) as running:
            cmd = [sys.executable, "-m", "weft", "run", str(wf), "--input", f"@{big}", "--json", "--timeout", "60"]
            done = await asyncio.to_thread(subprocess.run, cmd, env=env, cwd=ROOT, capture_output=True, timeout=120)
            assert done.returncode == 0, done.stderr.decode()[-2000:]
            result = orjson.loads(done.stdout)
            assert result["status"] == "completed" and result["output"]["bytes"] == len(orjson.dumps(data))
            before = running.stack.store.head()
            small = {**env, "WEFT_PAYLOAD_MAX": str(1024 * 1024)}
            refused = await asyncio.to_thread(subprocess.run, cmd, env=small, cwd=ROOT, capture_output=True,
                                              timeout=120)
            assert refused.returncode == 2
            err = refused.stderr.decode()
            assert "1048576" in err and str(len(orjson.dumps(data))) in err
            assert running.stack.store.head() == before

    asyncio.run(main())


async def test_an_oversized_unroutable_trigger_is_dead_lettered_and_reprocessed_by_reference(api: Api) -> None:
    """Published straight onto the broker (under its limit, over the dead-letter one), for a type no
    workflow subscribes to yet: its dead letter fits the broker, and reprocessing it once the
    workflow exists republishes it whole, its data by reference, and the execution completes."""
    from services.broker import OutMessage
    from services.triggers.publish import new_event, to_message

    data = {"rows": ["u" * 100] * 6_000}  # ~620 KiB
    event = new_event("late.subscriber", data, id="late-1", source="test")
    message = to_message(event)
    assert 256 * 1024 < len(message.data) < 1024 * 1024
    await api.running.stack.transport.publish(OutMessage(message.subject, message.data, message.msg_id,
                                                         message.headers))

    async def letter() -> Any:
        rows = (await api.client.get("/v1/deadletters", params={"kind": "trigger_unroutable"})).json()["items"]
        return rows or None

    [row] = await wait_until(letter, timeout=15)
    shown = (await api.client.get(f"/v1/deadletters/{row['id']}")).json()
    assert shown["headers"]["Weft-Payload-Truncated"] == "stored"
    assert shown["headers"]["Weft-Payload-Size"] == str(len(message.data))
    patched = await api.client.post("/v1/deadletters/reprocess", json={"ids": [row["id"]], "patch": {"id": "x"}})
    assert patched.status_code == 422 and "blob store" in patched.json()["error"]["message"]

    await api.publish(ON_TRIGGER.replace("big.arrived", "late.subscriber"))
    r = await api.client.post("/v1/deadletters/reprocess", json={"ids": [row["id"]]})
    assert r.status_code == 200, r.text

    async def started() -> Any:
        rows = (await api.client.get("/v1/executions", params={"workflow": "on-big-trigger"})).json()["items"]
        return rows or None

    [execution] = await wait_until(started, timeout=15)
    body = await api.finished(execution["id"])
    assert body["status"] == "completed" and body["output"]["bytes"] == len(orjson.dumps(data))
    assert (await api.client.get("/readyz")).status_code == 200
    await api.normal_run_completes()


HOOKED = """
name: hooked
on:
  - webhook: {path: /big}
steps:
  - id: count
    type: python
    with: {callable: "tests.integration.payload_steps:count"}
output: "${{ steps.count.output }}"
"""


async def test_a_big_webhook_body_goes_by_reference_and_over_the_maximum_is_413(api: Api) -> None:
    await api.publish(HOOKED)
    data = {"rows": ["w" * 100] * 12_000}  # ~1.2 MiB
    r = await api.client.post("/v1/webhooks/big", content=orjson.dumps(data),
                              headers={"content-type": "application/json", "X-Weft-Delivery": "d-1"})
    assert r.status_code == 202, r.text
    [eid] = r.json()["executions"].values()
    body = await api.finished(eid)
    assert body["status"] == "completed" and body["output"]["bytes"] == len(orjson.dumps(data))
    before = api.running.stack.store.head()
    over = await api.client.post("/v1/webhooks/big", content=orjson.dumps({"s": "o" * (MAX + 1)}),
                                 headers={"content-type": "application/json", "X-Weft-Delivery": "d-2"})
    assert over.status_code == 413 and str(MAX) in over.json()["error"]["message"]
    assert api.running.stack.store.head() == before
    await api.normal_run_completes()
