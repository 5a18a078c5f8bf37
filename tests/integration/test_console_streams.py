"""The live streams (`/v1/changes`, `/v1/executions/{id}/events`) against a real gateway over SQLite
and PostgreSQL and a real NATS: a tampered Last-Event-ID, resuming after a drop, a key bound to one
workflow resuming past what it may not see, many subscribers at once (bounded), and a client that
never reads (its stream ends and frees its slot; the gateway holds at most one event for it)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.integration.hostile_support import Gateway, running_gateway, status_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, nats_server: Any) -> Iterator[Gateway]:
    with running_gateway(request, tmp_path_factory.mktemp("console-streams"), nats_server.url) as gateway:
        yield gateway


class Subscriber:
    """A raw connection to a stream: opened, its status read, then read (or not) as the test says."""

    def __init__(self, gw: Gateway, target: str, key: str, *headers: str, rcvbuf: int | None = None):
        self.sock = socket.socket(socket.AF_INET6 if ":" in gw.host else socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect: the window the server may fill
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect((gw.host, gw.port))
        lines = [f"GET {target} HTTP/1.1", f"Host: {gw.host}:{gw.port}", f"Authorization: Bearer {key}", *headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""

    def status(self) -> int:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        return status_of(self.buffer)

    def body(self) -> bytes:
        """The whole body of an answer that has a Content-Length (an error)."""
        self.status()
        head, _, body = self.buffer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length:")))
        while len(body) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "closed before the whole body"
            body += chunk
        return body

    def events(self, until: Any, timeout: float = 15) -> list[dict[str, Any]]:
        """SSE blocks (id, event, data) until `until(blocks)` is true."""
        deadline = time.monotonic() + timeout
        while True:
            blocks = _blocks(self.buffer)
            if until(blocks):
                return blocks
            assert time.monotonic() < deadline, blocks
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            assert chunk, "the stream ended"
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def _blocks(raw: bytes) -> list[dict[str, Any]]:
    """Blocks of an SSE body (chunked transfer encoding: the chunk sizes are lines of their own)."""
    body = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split(b"\n"):
            name, sep, value = line.partition(b": ")
            if sep and name in (b"id", b"event", b"data"):
                fields[name.decode()] = orjson.loads(value) if name == b"data" else value.decode()
        if fields:
            out.append(fields)
    return out


@pytest.mark.parametrize("value", ["99999999999999999999999999999999", "4611686018427387905", "-5", "1_0", "abc",
                                   "\u0661\u0662", "0x10", "1e3", ""])
def test_a_tampered_last_event_id_is_a_422_naming_the_header(gw: Gateway, value: str) -> None:
    # Before: a 32-digit id went into the store's query after the stream had started (a 500 mid-stream).
    for path in ("/v1/changes", f"/v1/executions/{gw.mine}/events"):
        raw = gw.get_raw(path.encode(), b"Last-Event-ID: " + value.encode(), key=gw.admin)
        if value == "":  # an empty header is no header: the stream starts
            assert status_of(raw) == 200, raw[:300]
            continue
        assert status_of(raw) == 422, raw[:300]
        error = orjson.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["problems"][0]["field"] == "header.last-event-id" and "0 to 4611686018427387904" in error[
            "message"], error


@pytest.mark.parametrize(("after", "words"), [("-1", "greater than or equal to 0"), ("abc", "valid integer"),
                                              (str(2**62 + 1), "less than or equal to"), ("1e3", "valid integer")])
def test_a_hostile_after_is_a_422_naming_it(gw: Gateway, after: str, words: str) -> None:
    with gw.client(gw.admin) as c:
        r = c.get("/v1/changes", params={"after": after})
    assert r.status_code == 422 and r.json()["error"]["problems"][0]["field"] == "query.after" and words in r.text


def test_resuming_with_last_event_id_gives_what_came_after_and_nothing_twice(gw: Gateway) -> None:
    first = Subscriber(gw, "/v1/changes?after=0", gw.admin)
    assert first.status() == 200
    seen = first.events(lambda b: sum(1 for x in b if x.get("event") == "change") >= 3)
    first.close()
    changes = [x for x in seen if x.get("event") == "change"]
    again = Subscriber(gw, "/v1/changes", gw.admin, f"Last-Event-ID: {changes[0]['id']}")
    assert again.status() == 200
    resumed = again.events(lambda b: sum(1 for x in b if x.get("event") == "change") >= 2)
    again.close()
    after = [x for x in resumed if x.get("event") == "change"]
    assert [x["id"] for x in after[:2]] == [x["id"] for x in changes[1:3]]
    # the per-execution stream resumes by seq the same way
    events = Subscriber(gw, f"/v1/executions/{gw.mine}/events", gw.admin, "Last-Event-ID: 2")
    assert events.status() == 200
    got = events.events(lambda b: any(x.get("event") == "end" for x in b))
    events.close()
    assert [int(x["id"]) for x in got if "id" in x][0] == 3


def test_a_bound_key_resumes_past_what_it_may_not_see(gw: Gateway) -> None:
    ctx = gw.ctx
    beat, ctx.sse_heartbeat = ctx.sse_heartbeat, 0.3
    try:
        start = gw.stack.store.head()
        bound = Subscriber(gw, f"/v1/changes?after={start}", gw.bound)
        assert bound.status() == 200
        hidden = gw.start("other")
        gw.finished(hidden)
        head = gw.stack.store.head()
        blocks = bound.events(lambda b: any("id" in x and int(x["id"]) >= head - 5 for x in b))
        bound.close()
        assert not [x for x in blocks if "data" in x], blocks  # nothing of `other`, but the position moved
        assert max(int(x["id"]) for x in blocks if "id" in x) > start
    finally:
        ctx.sse_heartbeat = beat


def test_live_streams_are_bounded_and_a_closed_one_frees_its_slot(gw: Gateway) -> None:
    ctx = gw.ctx
    limit, ctx.max_streams = ctx.max_streams, 4  # and 2 for one key
    open_: list[Subscriber] = []

    def refused(key: str, words: str) -> None:
        over = Subscriber(gw, "/v1/changes", key)
        assert over.status() == 503
        error = orjson.loads(over.body())["error"]
        assert b"retry-after: 5" in over.buffer.partition(b"\r\n\r\n")[0].lower()
        assert words in error["message"] and error["code"] == "unavailable", error
        over.close()

    try:
        for key in (gw.admin, gw.admin):
            s = Subscriber(gw, "/v1/changes", key)
            assert s.status() == 200
            open_.append(s)
        refused(gw.admin, "this key has 2 live streams open, the limit for one key is 2")
        for key in (gw.bound, gw.bound):
            s = Subscriber(gw, "/v1/changes", key)
            assert s.status() == 200
            open_.append(s)
        refused(gw.bound, "4 live streams are open on this gateway, the limit is 4 (WEFT_GATEWAY_MAX_STREAMS)")
        open_.pop(0).close()  # an admin's: noticed on the stream's next poll

        def admitted() -> bool:
            s = Subscriber(gw, "/v1/changes", gw.admin)
            ok = s.status() == 200
            if ok:
                open_.append(s)
            else:
                s.close()
            return ok

        _eventually(admitted, 10, "a slot to be free again")
    finally:
        for s in open_:
            s.close()
        _eventually(lambda: ctx.open_streams == 0 and not ctx.streams_by_key, 10, "every stream to end")
        ctx.max_streams = limit


def test_a_client_that_never_reads_is_let_go_and_frees_its_slot(gw: Gateway) -> None:
    # 200 KB of input travels inline in ExecutionStarted: more than the socket buffers (made small
    # here, on the gateway's listening socket, which accepted sockets inherit) and uvicorn's
    # high-water mark hold, so the gateway's writes stop (flow control) instead of buffering the
    # stream, and after sse_write_timeout the stream ends and its slot is free.
    ctx = gw.ctx
    eid = gw.start("two-steps", {"blob": "x" * 200_000})
    gw.finished(eid)
    listening: socket.socket = gw.stack.gateway.sock
    sndbuf = listening.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    limit, timeout = ctx.max_streams, ctx.sse_write_timeout
    ctx.max_streams, ctx.sse_write_timeout = 1, 1.0
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stalled = Subscriber(gw, f"/v1/executions/{eid}/events", gw.admin, rcvbuf=4096)
    try:
        time.sleep(0.5)  # it has its slot: the next stream is refused
        assert status_of(gw.get_raw(b"/v1/changes", key=gw.admin)) == 503

        def admitted() -> bool:
            s = Subscriber(gw, "/v1/changes", gw.admin)
            ok = s.status() == 200
            s.close()
            return ok

        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        _eventually(admitted, 15, "the stalled stream to be let go")
        # what the stalled client gets when it finally reads: the start, never the end, then EOF
        stalled.sock.settimeout(10)
        data = b""
        while chunk := stalled.sock.recv(1 << 20):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"event: end" not in data and len(data) < 400_000
    finally:
        stalled.close()
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        _eventually(lambda: ctx.open_streams == 0, 10, "every stream to end")
        ctx.max_streams, ctx.sse_write_timeout = limit, timeout


def _eventually(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_long_history_streams_page_by_page_in_order_without_gaps(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.gateway import routes_executions

    monkeypatch.setattr(routes_executions, "STREAM_PAGE", 2)  # the history below spans several pages
    with gw.client(gw.admin) as c:
        total = len(c.get(f"/v1/executions/{gw.mine}/history").json()["items"])
    assert total > 4
    s = Subscriber(gw, f"/v1/executions/{gw.mine}/events", gw.admin)
    assert s.status() == 200
    blocks = s.events(lambda b: any(x.get("event") == "end" for x in b))
    s.close()
    assert [int(x["id"]) for x in blocks if "id" in x] == list(range(1, total + 1))


NAP = "name: nap\nsteps:\n  - {id: z, type: sleep, with: {seconds: 60}}\n"


@pytest.mark.parametrize("path", ["/v1/changes", "/v1/executions/{eid}/events"])
def test_a_key_revoked_while_its_stream_is_open_stops_receiving(gw: Gateway, path: str) -> None:
    ctx = gw.ctx
    recheck, ctx.key_recheck = ctx.key_recheck, 0.2
    with gw.client(gw.admin) as c:
        assert c.post("/v1/workflows", content=NAP, headers={"content-type": "application/yaml"}).status_code in (200, 201)
        made = c.post("/v1/keys", json={"scopes": ["read"], "name": "leaving"}).json()
    eid = gw.start("nap")  # asleep for a minute: its event stream stays open
    target = path.replace("{eid}", eid)
    try:
        s = Subscriber(gw, target, made["key"])
        assert s.status() == 200
        with gw.client(gw.admin) as c:
            assert c.delete(f"/v1/keys/{made['id']}").status_code == 200
        started = time.monotonic()
        while chunk := s.sock.recv(65536):  # the gateway ends the stream: EOF (the keys' cache holds a key 2 s)
            s.buffer += chunk
            assert time.monotonic() - started < 15, "the revoked key's stream went on"
        s.close()
        assert b"event: end" not in s.buffer  # ended for the key, not because the execution finished
        assert status_of(gw.get_raw(target.encode(), key=made["key"])) == 401
    finally:
        ctx.key_recheck = recheck
        with gw.client(gw.admin) as c:
            c.post(f"/v1/executions/{eid}/cancel")
