"""A CloudEvents batch when the broker goes away, against a real gateway over SQLite and PostgreSQL
and a NATS server of this test's own (stopped and started again on the same port and store):
while it is down a batch is answered 503 per event and whole (Retry-After), never a 500; once it is
back the same batch sent again is accepted, and sent a third time is all duplicates; each event
starts its workflow exactly once, whether it was stored by the retry or late, by the NATS client
flushing what it had buffered while reconnecting. A single event whose id the gateway made up
(Weft's shorthand) is answered 503 with that id, so the client's retry is the same event."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from services.triggers.ingest import trigger_execution_id
from tests.fixtures_nats import start_nats_server
from tests.integration.hostile_support import Gateway, running_gateway

pytestmark = pytest.mark.integration
BATCH = "application/cloudevents-batch+json"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def outage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Any]]:
    nats = start_nats_server(tmp_path_factory.mktemp("nats-outage") / "store")
    try:
        with running_gateway(request, tmp_path_factory.mktemp("ce-outage"), nats.url) as gateway:
            yield gateway, nats
    finally:
        nats.stop()


def _send(gw: Gateway, events: list[dict[str, Any]]) -> Any:
    with gw.client(gw.admin) as c:
        return c.post("/v1/triggers", content=orjson.dumps(events), headers={"content-type": BATCH})


def _ready(gw: Gateway, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with gw.client() as c:
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not get its broker back"
            time.sleep(0.2)


def test_a_batch_retried_after_a_503_starts_each_event_once(outage: tuple[Gateway, Any]) -> None:
    gw, nats = outage
    transport = gw.stack.transport
    retry_for, transport._publish_retry_for = transport._publish_retry_for, 1.0  # answer fast while it is down
    source = f"outage-{uuid.uuid4().hex[:6]}"
    events = [{"specversion": "1.0", "id": f"e{n}", "source": source, "type": "other.happened", "data": {"n": n}}
              for n in range(20)]
    try:
        nats.stop()
        down = _send(gw, events)
        assert down.status_code == 503, down.text[:500]
        assert down.headers["retry-after"] == "1"
        error = down.json()["error"]
        assert error["code"] == "unavailable" and "none of the 20 events was accepted" in error["message"]
        assert [p["field"] for p in error["problems"]] == [f"body[{n}]" for n in range(20)]
        assert all("send it again" in p["message"] for p in error["problems"])
        # a batch with one invalid event while the broker is down: still 503 (worth a retry), each said
        mixed = _send(gw, [events[0], {**events[1], "specversion": "0.3"}])
        assert mixed.status_code == 503 and {p["field"] for p in mixed.json()["error"]["problems"]} == {
            "body[0]", "body[1].specversion"}
        # one event in Weft's shorthand, its id left to the gateway: the 503 says which id to send again
        with gw.client(gw.admin) as c:
            single = c.post("/v1/triggers", json={"type": "other.happened", "data": {"n": 99}})
        assert single.status_code == 503 and single.headers["retry-after"] == "1", single.text
        made_up = single.json()["error"]["problems"][0]["message"]
        assert f"id {made_up!r}" in single.json()["error"]["message"]
        nats.restart()
        _ready(gw)
        with gw.client(gw.admin) as c:
            retried = c.post("/v1/triggers", json={"type": "other.happened", "id": made_up, "data": {"n": 99}})
        assert retried.status_code == 202, retried.text
        ids_extra = trigger_execution_id("other", "weft:api", made_up)
        again = _send(gw, events)
        assert again.status_code == 202 and again.json()["accepted"] == 20, again.text[:500]
        third = _send(gw, events)
        assert third.status_code == 202 and all(i["duplicate"] for i in third.json()["items"]), third.text[:500]
    finally:
        transport._publish_retry_for = retry_for
    ids = {trigger_execution_id("other", source, e["id"]) for e in events} | {ids_extra}
    with gw.client(gw.admin) as c:
        deadline = time.monotonic() + 60
        while True:
            listed = [x for x in c.get("/v1/executions", params={"workflow": "other", "limit": 500}).json()["items"]
                      if x["id"] in ids]
            if len(listed) == 21 and all(x["status"] == "completed" for x in listed):
                break
            assert time.monotonic() < deadline, f"{len(listed)} of 21 executions"
            time.sleep(0.2)
        time.sleep(1.0)  # time for anything published twice to be ingested twice
        for eid in ids:
            started = [e for e in c.get(f"/v1/executions/{eid}/history").json()["items"]
                       if e["type"] == "ExecutionStarted"]
            assert len(started) == 1, eid
        everything = c.get("/v1/executions", params={"workflow": "other", "limit": 500}).json()["items"]
        assert len(everything) == 22  # the fixture's own execution and one per event
