"""Step code and secrets through a real stack (NATS, SQLite/PostgreSQL, relay, orchestrator, worker,
projector, dead letters, gateway): a definition cannot choose the standard library's code, and a
secret's value reaches the step and nothing else (issue 14, items 1, 4 and 6)."""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import nats
import orjson
import psycopg
import pytest
from psycopg.sql import SQL, Identifier

from tests.support import stack_up, wait_until

pytestmark = pytest.mark.integration
ALL_BUT_TRIGGERS = ("orchestrator", "relay", "worker", "projector", "deadletters", "gateway")


# ---- 1. only allowed modules ------------------------------------------------------------------


def _attack(name: str, path: str) -> str:
    return f"""
name: {name}
steps:
  - id: run
    type: python
    with: {{callable: "{path}"}}
    input: "${{{{ input.arg }}}}"
    retry: {{max_attempts: 3, initial_delay: 0}}
"""


async def test_the_standard_library_is_not_callable_and_nothing_runs(
    tmp_path: Path, sqlite_url: str, nats_url: str
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("still here")
    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'w').close()"
    attacks = {
        "os:system": f"touch {marker}",
        "subprocess:run": ["touch", str(marker)],
        "cProfile:run": code,
        "pty:spawn": ["touch", str(marker)],
        "shutil:rmtree": str(victim),
        "builtins:exec": code,
        "profile:run": code,
    }
    not_yet_imported = {m for m in ("cProfile", "profile", "pty") if m not in sys.modules}
    async with stack_up(tmp_path, sqlite_url, nats_url, step_modules="tests,examples") as stack:
        ids = {}
        for i, (path, arg) in enumerate(attacks.items()):
            ids[path] = await stack.start(stack.publish(_attack(f"attack-{i}", path)), {"arg": arg})
        for path, eid in ids.items():
            state = await stack.finished(eid)
            assert state.status == "failed", path
            step, error_type, message = state.error
            assert error_type == "CallableNotAllowed", (path, state.error)
            assert "WEFT_STEP_MODULES" in message and path in message
            history = await stack.history(eid)
            assert [e.type for e in history].count("StepScheduled") == 1, f"{path} was retried"
        # Step code the operator allowed still runs, right after.
        ok = await stack.start(stack.publish((Path(__file__).parents[2] / "examples/order.yaml").read_text()),
                               {"order_id": "A-1", "items": ["fig"]})
        assert (await stack.finished(ok)).status == "completed"
    assert not marker.exists()
    assert (victim / "keep").read_text() == "still here"
    assert not_yet_imported.isdisjoint(sys.modules), "a refused module was imported (importing runs it)"


async def test_an_empty_allowlist_refuses_even_the_projects_code(tmp_path: Path, sqlite_url: str, nats_url: str) -> None:
    async with stack_up(tmp_path, sqlite_url, nats_url, step_modules="") as stack:
        eid = await stack.start(stack.publish(_attack("own-code", "tests.integration.steps:positive")), {"arg": {"n": 1}})
        state = await stack.finished(eid)
        assert state.error[1] == "CallableNotAllowed" and "(none)" in state.error[2]


async def test_the_gateway_of_a_stack_warns_when_publishing_a_refused_callable(
    tmp_path: Path, sqlite_url: str, nats_url: str
) -> None:
    async with stack_up(tmp_path, sqlite_url, nats_url, ALL_BUT_TRIGGERS, gateway_auth=False) as stack:
        async with httpx.AsyncClient(base_url=stack.stack.gateway.url) as api:
            r = await api.post("/v1/workflows", content=_attack("warned", "os:system"))
            assert r.status_code == 201, r.text
            assert len(r.json()["warnings"]) == 1 and "WEFT_STEP_MODULES" in r.json()["warnings"][0]
            r = await api.post("/v1/workflows", content=_attack("fine", "tests.integration.steps:positive"))
            assert r.status_code == 201 and r.json()["warnings"] == []
            literal = "name: literal\nsteps:\n  - {id: a, type: http, with: {url: 'https://a.example', " \
                      "headers: {X-API-Key: k3y}}}\n"
            r = await api.post("/v1/workflows", content=literal)
            assert r.status_code == 422, r.text
            problem = r.json()["error"]["problems"][0]
            assert problem["field"] == "body.steps[0].with.headers.X-API-Key" and "${{ secrets." in problem["message"]
            assert "k3y" not in r.text


# ---- 4. secrets by reference, 6. http with expressions --------------------------------------------

TOKEN = "tok-7Hq2-secret-value"
FILE_SECRET = "file-Zx91-secret-value"


class _Api(BaseHTTPRequestHandler):
    """Answers with the headers and body it was sent, as a careless API would."""

    seen: list[dict[str, Any]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        got = {"headers": {k.lower(): v for k, v in self.headers.items()}, "body": orjson.loads(raw or b"null")}
        type(self).seen.append(got)
        body = orjson.dumps(got)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def api_server() -> Iterator[str]:
    _Api.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/hook"
    srv.shutdown()
    srv.server_close()


USES_SECRETS = """
name: uses-secrets
steps:
  - id: call
    type: http
    with:
      method: POST
      url: "${{ input.url }}"
      headers: {Authorization: "Bearer ${{ secrets.API_TOKEN }}"}
    input: {body: {note: "${{ secrets.FILE_SECRET }}", who: "${{ input.who }}"}}
  - id: echo
    type: python
    needs: [call]
    with: {callable: "tests.integration.steps:echo_secret"}
    input: {token: "${{ secrets.API_TOKEN }}", status: "${{ steps.call.output.status }}"}
output: {call: "${{ steps.call.output }}", echo: "${{ steps.echo.output }}"}
"""
LEAKS_IN_ERROR = """
name: leaks-in-error
steps:
  - id: login
    type: python
    with: {callable: "tests.integration.steps:fail_with_secret"}
    input: {token: "${{ secrets.API_TOKEN }}"}
    retry: {max_attempts: 1}
"""
MISSING = """
name: missing-secret
steps:
  - id: call
    type: http
    with: {url: "${{ input.url }}", headers: {X-API-Key: "${{ secrets.NOT_THERE }}"}}
    retry: {max_attempts: 3, initial_delay: 0}
"""


async def test_secrets_reach_the_step_and_nothing_else(
    tmp_path: Path, db_url: str, nats_url: str, api_server: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("WEFT_SECRET_API_TOKEN", TOKEN)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "FILE_SECRET").write_text(FILE_SECRET + "\n")
    wire: list[bytes] = []
    async with stack_up(tmp_path, db_url, nats_url, ALL_BUT_TRIGGERS, gateway_auth=False, http_allow_private=True,
                        secrets_dir=secrets_dir) as stack:
        # Everything published on the broker, as it goes by (the work queues forget acked messages).
        nc = await nats.connect(nats_url)

        async def capture(msg: Any) -> None:
            wire.append(msg.subject.encode() + b" " + orjson.dumps(msg.headers or {}) + b" " + msg.data)

        try:
            await nc.subscribe(">", cb=capture)
            used = await stack.start(stack.publish(USES_SECRETS), {"url": api_server, "who": "${{ secrets.API_TOKEN }}"})
            leaked = await stack.start(stack.publish(LEAKS_IN_ERROR), {})
            missing = await stack.start(stack.publish(MISSING), {"url": api_server})
            done = await stack.finished(used)
            assert done.status == "completed", done.error
            # The API got the real values, from the environment and from the secrets folder...
            assert _Api.seen[0]["headers"]["authorization"] == f"Bearer {TOKEN}"
            assert _Api.seen[0]["body"] == {"note": FILE_SECRET, "who": "${{ secrets.API_TOKEN }}"}  # data stays data
            # ...and what the steps echoed came back redacted.
            assert done.output["call"]["body"]["headers"]["authorization"] == "Bearer ***"
            assert done.output["echo"]["sentence"] == "the token is ***"
            failed = await stack.finished(leaked)
            assert failed.error[1] == "NonRetryableError" and "***" in failed.error[2]
            absent = await stack.finished(missing)
            assert absent.error[1] == "MissingSecret" and "NOT_THERE" in absent.error[2]
            assert [e.type for e in await stack.history(missing)].count("StepScheduled") == 1
            async with httpx.AsyncClient(base_url=stack.stack.gateway.url) as api:
                letters = await wait_until(lambda: _letters(api, {leaked, missing}), what="the dead letters")
                responses = [letters.text]
                for eid in (used, leaked, missing):
                    responses += [(await api.get(f"/v1/executions/{eid}")).text,
                                  (await api.get(f"/v1/executions/{eid}/history")).text]
                for item in letters.json()["items"]:
                    responses.append((await api.get(f"/v1/deadletters/{item['id']}")).text)
            await nc.flush()
        finally:
            await nc.close()
        streams = await _every_stream_message(nats_url, stack.stack.settings.namespace)
    stored = _every_stored_row(db_url)
    assert "Bearer ${{ secrets.API_TOKEN }}" in stored  # the references are stored, and...
    for where, text in [("the event store", stored), ("the broker's traffic", b"\n".join(wire).decode(errors="replace")),
                        ("the broker's streams", streams), ("the logs", caplog.text), ("API responses", "".join(responses))]:
        for secret in (TOKEN, FILE_SECRET):
            assert secret not in text, f"{secret} found in {where}"
    # The work queues forget acked messages, so the streams may hold none by now: the wire has them all.
    assert len(wire) > 10 and caplog.text  # the greps looked at something


async def _letters(api: httpx.AsyncClient, ids: set[str]) -> Any:
    r = await api.get("/v1/deadletters")
    return r if {i["execution_id"] for i in r.json()["items"]} >= ids else None


async def _every_stream_message(url: str, namespace: str) -> str:
    """Every message still held by every stream of this stack's namespace."""
    nc = await nats.connect(url)
    out: list[str] = []
    try:
        js = nc.jetstream()
        every: list[Any] = []
        while page := await js.streams_info(offset=len(every)):  # the server lists 256 at a time
            every.extend(page)
        mine = [i for i in every if i.config.name.endswith(f"_{namespace.upper()}")]
        assert len(mine) >= 4, [i.config.name for i in mine]
        for info in mine:
            state = info.state
            if not state.messages:
                continue
            for seq in range(max(state.first_seq, 1), state.last_seq + 1):
                try:
                    msg = await js.get_msg(info.config.name, seq)
                except nats.js.errors.NotFoundError:
                    continue
                out.append(f"{msg.subject} {msg.headers} {(msg.data or b'').decode(errors='replace')}")
    finally:
        await nc.close()
    return "\n".join(out)


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _every_stored_row(db_url: str) -> str:
    """Every value of every row of every table of the store (bytes decoded), and for SQLite its raw files."""
    rows: list[str] = []
    if db_url.startswith("sqlite"):
        path = urlsplit(db_url).path
        con = sqlite3.connect(path)
        try:
            tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                rows += [" ".join(map(_text, row)) for row in con.execute(f'SELECT * FROM "{table}"')]
        finally:
            con.close()
        raw = b"".join(p.read_bytes() for p in Path(path).parent.glob(Path(path).name + "*"))
        return "\n".join(rows) + raw.decode("latin-1")
    base, _, schema = db_url.partition("?schema=")
    with psycopg.connect(base, autocommit=True) as conn:
        tables = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                              (schema,)).fetchall()
        for (table,) in tables:
            query = SQL("SELECT * FROM {0}.{1}").format(Identifier(schema), Identifier(table))
            rows += [" ".join(map(_text, row)) for row in conn.execute(query)]
    assert len(tables) > 3
    return "\n".join(rows)


HTTP_TO = """
name: http-to
steps:
  - {id: call, type: http, with: {method: POST, url: "${{ input.url }}"}, retry: {max_attempts: 1}}
output: "${{ steps.call.output.status }}"
"""


async def test_allowed_hosts_and_ports_are_a_setting_of_the_worker(
    tmp_path: Path, sqlite_url: str, nats_url: str, api_server: str
) -> None:
    port = urlsplit(api_server).port
    assert port is not None
    async with stack_up(tmp_path, sqlite_url, nats_url, http_allowed_hosts=f"127.0.0.1:{port}") as stack:
        version = stack.publish(HTTP_TO)
        allowed = await stack.start(version, {"url": api_server})
        other_port = await stack.start(version, {"url": f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/"})
        by_name = await stack.start(version, {"url": f"http://localhost:{port}/hook"})
        assert (await stack.finished(allowed)).output == 200
        for eid in (other_port, by_name):
            state = await stack.finished(eid)
            assert state.error[1] == "SsrfBlocked" and "loopback" in state.error[2], state.error
