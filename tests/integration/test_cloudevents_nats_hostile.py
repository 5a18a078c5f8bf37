"""Hostile CloudEvents on the trigger topic, written byte by byte to a real NATS server (HPUB, what
no client library would send) and consumed by the real trigger consumer over SQLite and
PostgreSQL: header values that are not UTF-8, header names that are not ASCII, 500 attribute
headers, a 60 KB attribute, 100,000-deep data. Each is dead-lettered as trigger_invalid with its
reason or (a name the NATS client drops) accepted without it; none starts anything it should not,
and a normal event right after still starts its workflow. Over HTTP: a batch of 8 million empty
objects (24 MiB, 600 MB once parsed) is refused before it is parsed, naming the element budget, and
so is such an execution input (the gateway's body check, before FastAPI parses it). One batch naming
one event twice publishes it once, and says which repeat differs (409) instead of dropping it unsaid.
And over HTTP in every mode: 100 MB (413), 10,000 levels (422), bytes that are not UTF-8 in the body
or a ce-* header (422 naming it)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from contracts.subjects import trigger_subject
from services.triggers.ingest import trigger_execution_id
from tests.integration.hostile_support import Gateway, running_gateway

pytestmark = pytest.mark.integration
BASE = b"ce-specversion: 1.0\r\nce-source: hostile\r\nce-type: other.happened\r\n"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, nats_server: Any) -> Iterator[Gateway]:
    with running_gateway(request, tmp_path_factory.mktemp("ce-nats"), nats_server.url) as gateway:
        yield gateway


def _hpub(url: str, subject: str, headers: bytes, body: bytes) -> bytes:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.recv(65536)  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        head = b"NATS/1.0\r\n" + headers + b"\r\n"
        s.sendall(f"HPUB {subject} {len(head)} {len(head) + len(body)}\r\n".encode() + head + body + b"\r\nPING\r\n")
        out = b""
        while b"PONG" not in out and b"-ERR" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def test_hostile_nats_events_are_dead_lettered_and_the_stack_carries_on(gw: Gateway, nats_server: Any) -> None:
    triggers = gw.stack.triggers
    subject = gw.stack.transport.subject(trigger_subject("other.happened"))
    invalid_before, handled_before = triggers.invalid, triggers.handled
    cases = [  # (headers, body, refused)
        (BASE + b"ce-id: \xff\xfe\r\n", b"{}", True),  # the NATS client turns these into U+FFFD
        (BASE + b"ce-id: h-many\r\n" + b"".join(f"ce-x{i}: v\r\n".encode() for i in range(500)), b"{}", True),
        (BASE + b"ce-id: h-big\r\nce-big: " + b"v" * 60_000 + b"\r\n", b"{}", True),
        (BASE + b"ce-id: h-deep\r\ncontent-type: application/json\r\n", b"[" * 100_000 + b"]" * 100_000, True),
        (BASE + b"ce-id: h-bytes\r\ncontent-type: application/octet-stream\r\n", b"\xff\xfe\x00", True),
        (BASE + b"ce-id: h-name\r\nce-\xff: v\r\n", b"{}", False),  # a non-ASCII name is dropped by the client
    ]
    for headers, body, _ in cases:
        assert b"PONG" in _hpub(nats_server.url, subject, headers, body)
    refused = sum(1 for *_, r in cases if r)
    deadline = time.monotonic() + 30
    while triggers.handled - handled_before < len(cases):
        assert time.monotonic() < deadline, (triggers.handled - handled_before, triggers.invalid - invalid_before)
        time.sleep(0.1)
    assert triggers.invalid - invalid_before == refused
    with gw.client(gw.admin) as c:
        for event_id in ("\ufffd\ufffd", "h-many", "h-big", "h-deep", "h-bytes"):
            eid = trigger_execution_id("other", "hostile", event_id)
            assert c.get(f"/v1/executions/{eid}").status_code == 404, event_id
    gw.finished(trigger_execution_id("other", "hostile", "h-name"))
    ok = BASE + b"ce-id: h-after\r\n"
    assert b"PONG" in _hpub(nats_server.url, subject, ok, b'{"n": 1}')
    deadline = time.monotonic() + 30
    with gw.client(gw.admin) as c:
        eid = trigger_execution_id("other", "hostile", "h-after")
        while c.get(f"/v1/executions/{eid}").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert gw.finished(eid)["status"] == "completed"


def test_a_batch_of_millions_of_tiny_values_is_refused_before_it_is_parsed(gw: Gateway) -> None:
    body = b"[" + b"{}," * (8 * 1024 * 1024) + b"{}]"
    started = time.monotonic()
    with gw.client(gw.admin) as c:
        r = c.post("/v1/triggers", content=body, headers={"content-type": "application/cloudevents-batch+json"})
        assert r.status_code == 422, r.text[:300]
        error = r.json()["error"]
        assert error["problems"] == [{"field": "body", "message": "more than 2000000 elements"}], error
        assert time.monotonic() - started < 10
        # the same for every JSON body FastAPI would parse whole: an execution's input
        items = b"{}," * (8 * 1024 * 1024) + b"{}"
        r = c.post("/v1/executions", content=b'{"workflow": "other", "input": [' + items + b"]}",
                   headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["problems"][0]["message"] == "more than 2000000 elements"
        assert time.monotonic() - started < 20
        assert c.get("/healthz").status_code == 200


def test_one_batch_naming_one_event_twice_publishes_it_once_and_says_which_differs(gw: Gateway) -> None:
    source = f"twice-{time.monotonic_ns()}"

    def ev(event_id: str, n: int) -> dict[str, Any]:
        return {"specversion": "1.0", "id": event_id, "source": source, "type": "other.happened", "data": {"n": n}}

    with gw.client(gw.admin) as c:
        r = c.post("/v1/triggers", content=orjson.dumps([ev("a", 1), ev("a", 1), ev("a", 2), ev("b", 3)]),
                   headers={"content-type": "application/cloudevents-batch+json"})
        assert r.status_code == 207, r.text
        items = r.json()["items"]
        assert [i["status"] for i in items] == [202, 202, 409, 202]
        assert items[1]["duplicate"] is True and items[0]["duplicate"] is False
        assert items[2]["error"]["problems"] == [{"field": "body[2].id", "message": items[2]["error"]["message"]}]
        assert "the same source and id as body[0]" in items[2]["error"]["message"]
    done = gw.finished(trigger_execution_id("other", source, "a"))
    assert done["input"] == {"n": 1}


def test_hostile_http_cloudevents_name_the_field_and_the_limit(gw: Gateway) -> None:
    ce = {"ce-id": "d-1", "ce-source": "hostile", "ce-type": "other.happened", "ce-specversion": "1.0"}
    deep = b"[" * 10_000 + b"]" * 10_000
    with gw.client(gw.admin) as c:
        def post(body: bytes, **headers: str) -> Any:
            return c.post("/v1/triggers", content=body, headers=headers)

        big = post(b"[" + b" " * (100 * 1024 * 1024) + b"]", **{"content-type": "application/cloudevents-batch+json"})
        assert big.status_code == 413 and "over the limit of" in big.json()["error"]["message"], big.text[:300]
        assert c.post("/v1/projections/timeline/rebuild", content=b"x" * (100 * 1024 * 1024)).status_code == 413
        for r in (post(deep, **{"content-type": "application/cloudevents-batch+json"}),
                  post(b'{"specversion":"1.0","id":"d","source":"s","type":"other.happened","data":' + deep + b"}",
                       **{"content-type": "application/cloudevents+json"}),
                  post(deep, **ce, **{"content-type": "application/json"})):
            assert r.status_code == 422 and "nested deeper than 100 levels" in r.text, r.text[:300]
        bad = post(b'{"type":"other.happened","data":"\xff"}', **{"content-type": "application/json"})
        assert bad.status_code == 422 and "not UTF-8 text" in bad.text and bad.json()["error"]["problems"][0][
            "field"] == "body"
    raw = gw.raw(b"POST /v1/triggers HTTP/1.1\r\nHost: " + f"{gw.host}:{gw.port}".encode() + b"\r\nAuthorization: "
                 b"Bearer " + gw.admin.encode() + b"\r\nce-id: \xff\xfe\r\nce-source: s\r\nce-type: other.happened\r\n"
                 b"ce-specversion: 1.0\r\ncontent-type: application/json\r\nContent-Length: 2\r\nConnection: close"
                 b"\r\n\r\n{}")
    assert raw.startswith(b"HTTP/1.1 422") and b'"field":"headers.ce-id"' in raw and b"not UTF-8" in raw, raw[-400:]
