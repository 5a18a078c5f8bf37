"""Hostile HTTP input against a real gateway over a real store (SQLite and PostgreSQL) and NATS
(issue 13): each case below answered 500 before, and must be a 4xx whose error names the field
and the limit, with nothing stored. And expressions with a budget through the whole stack: the
[@,@] bomb fails its step with the reason, lands in the dead-letter store, and a normal
execution completes right after.

One stack per backend serves every case (it runs in a thread of its own: tests/support.Background).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.sql import SQL, Identifier

from services.gateway.keys import Keys
from services.settings import Settings
from tests.support import Background

pytestmark = pytest.mark.integration
PARTS = ("orchestrator", "relay", "worker", "projector", "triggers", "gateway")

ECHO = """
name: echo
steps:
  - {id: say, type: transform, with: {expression: "msg"}, input: {msg: "${{ input.msg }}"}}
output: "${{ steps.say.output }}"
"""
BOMB = "input.v" + " | [@,@]" * 40  # 327 characters, 2^40 elements once serialized
BOMB_IN_INPUT = f"""
name: bomb-input
steps:
  - {{id: first, type: noop}}
  - {{id: blow, type: noop, needs: [first], input: {{v: "${{{{ {BOMB} }}}}"}}}}
"""
BOMB_IN_TRANSFORM = f"""
name: bomb-transform
steps:
  - {{id: blow, type: transform, with: {{expression: "{BOMB.replace("input.", "")}"}}, input: {{v: 1}},
     retry: {{max_attempts: 5, initial_delay: 0}}}}
"""

DEEP = "[" * 900 + "]" * 900
BIG = "100000000000000000000000"  # 77 bits
SURROGATE = '"\\ud800"'  # the JSON escape of a lone surrogate


class Gateway:
    def __init__(self, client: httpx.Client, execution_id: str):
        self.client, self.execution_id = client, execution_id

    def json(self, path: str, text: str) -> httpx.Response:
        return self.client.post(path.format(eid=self.execution_id), content=text.encode(),
                                headers={"content-type": "application/json"})

    def finished(self, eid: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.client.get(f"/v1/executions/{eid}").json()
            if body["status"] in ("completed", "failed", "cancelled"):
                return body
            assert time.monotonic() < deadline, f"{eid} did not finish: {body}"
            time.sleep(0.05)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            nats_server: Any) -> Iterator[Gateway]:
    tmp: Path = tmp_path_factory.mktemp("hostile")
    schema = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'weft.db'}"
    else:
        server = request.getfixturevalue("pg_server_url")
        schema = f"t_{uuid.uuid4().hex}"
        url = f"{server}?schema={schema}"
    settings = Settings(home=tmp, database_url=url, nats_url=nats_server.url, namespace=f"h{uuid.uuid4().hex[:8]}",
                        poll_interval=0.02, ack_wait=5.0)
    try:
        with Background(settings, PARTS) as stack:
            token, _ = Keys(stack.store).create(["admin"], name="hostile")
            with httpx.Client(base_url=stack.gateway.url, headers={"Authorization": f"Bearer {token}"},
                              timeout=30) as client:
                published = client.post("/v1/workflows", content=ECHO, headers={"content-type": "application/yaml"})
                assert published.status_code == 201, published.text
                started = client.post("/v1/executions", json={"workflow": "echo", "input": {"msg": "hi"}})
                assert started.status_code == 201, started.text
                yield Gateway(client, started.json()["id"])
    finally:
        if schema is not None:
            with psycopg.connect(request.getfixturevalue("pg_server_url"), autocommit=True) as conn:
                conn.execute(SQL("DROP SCHEMA IF EXISTS {0} CASCADE").format(Identifier(schema)))


# (case, route, JSON body text, the field the error names, words of the message)
JSON_CASES = [
    ("900-deep input", "/v1/executions", f'{{"workflow": "echo", "input": {DEEP}}}', "body.input[0]",
     "nested deeper than 100 levels"),
    ("900-deep trigger data", "/v1/triggers", f'{{"type": "echo.requested", "data": {DEEP}}}', "body.data[0]",
     "nested deeper than 100 levels"),
    ("900-deep replay patch", "/v1/executions/{eid}/replay", f'{{"input_patch": {{"msg": {DEEP}}}}}',
     "body.input_patch.msg[0]", "nested deeper than 100 levels"),
    ("900-deep bulk replay patch", "/v1/replays", f'{{"filter": {{"workflow": "echo"}}, "input_patch": {{"msg": {DEEP}}}}}',
     "body.input_patch.msg[0]", "nested deeper than 100 levels"),
    ("900-deep dead-letter patch", "/v1/deadletters/reprocess", f'{{"ids": ["x"], "patch": {DEEP}}}', "body.patch[0]",
     "nested deeper than 100 levels"),
    ("5000-deep input (past the parser)", "/v1/executions",
     '{"workflow": "echo", "input": ' + "[" * 5000 + "]" * 5000 + "}", "body", "nested deeper than 100 levels"),
    ("lone surrogate in input", "/v1/executions", f'{{"workflow": "echo", "input": {{"msg": {SURROGATE}}}}}',
     "body.input.msg", "lone UTF-16 surrogate"),
    ("lone surrogate in a key", "/v1/executions", f'{{"workflow": "echo", "input": {{{SURROGATE}: 1}}}}',
     "body.input[", "lone UTF-16 surrogate"),
    ("lone surrogate in trigger data", "/v1/triggers", f'{{"type": "echo.requested", "data": [{SURROGATE}]}}',
     "body.data[0]", "lone UTF-16 surrogate"),
    ("lone surrogate in a trigger type", "/v1/triggers", f'{{"type": "x{SURROGATE[1:-1]}", "data": 1}}', "body.type",
     "lone UTF-16 surrogate"),
    ("77-bit integer in input", "/v1/executions", f'{{"workflow": "echo", "input": {{"msg": {BIG}}}}}',
     "body.input.msg", "64-bit range"),
    ("77-bit version", "/v1/executions", f'{{"workflow": "echo", "version": {BIG}}}', "body.version", "64-bit range"),
    ("77-bit integer in trigger data", "/v1/triggers", f'{{"type": "echo.requested", "data": {BIG}}}', "body.data",
     "64-bit range"),
    ("77-bit replay version", "/v1/executions/{eid}/replay", f'{{"version": {BIG}}}', "body.version", "64-bit range"),
    ("77-bit integer in replay patch", "/v1/executions/{eid}/replay", f'{{"input_patch": {{"n": -{BIG}}}}}',
     "body.input_patch.n", "64-bit range"),
    ("NaN in input", "/v1/executions", '{"workflow": "echo", "input": {"msg": NaN}}', "body.input.msg", "finite"),
    ("1e400 in input", "/v1/executions", '{"workflow": "echo", "input": {"msg": 1e400}}', "body.input.msg", "finite"),
    ("900-deep JSON definition", "/v1/workflows",
     f'{{"name": "w", "steps": [{{"id": "a", "type": "noop", "input": {DEEP}}}]}}', "body", "nested deeper than 100"),
    ("lone surrogate in a definition", "/v1/workflows",
     f'{{"name": "w", "steps": [{{"id": "a", "type": "noop", "input": {{"v": {SURROGATE}}}}}]}}',
     "body.steps[0].input.v", "lone UTF-16 surrogate"),
    ("77-bit integer in a definition", "/v1/workflows",
     f'{{"name": "w", "steps": [{{"id": "a", "type": "noop", "retry": {{"max_attempts": {BIG}}}}}]}}',
     "body.steps[0].retry.max_attempts", "64-bit range"),
]


@pytest.mark.parametrize(("case", "route", "text", "field", "words"), JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_hostile_json_is_a_422_naming_the_field_and_the_limit(gateway: Gateway, case: str, route: str, text: str,
                                                              field: str, words: str) -> None:
    r = gateway.json(route, text)
    assert r.status_code == 422, (case, r.status_code, r.text[:500])
    error = r.json()["error"]
    assert error["code"] == "invalid" and words in error["message"], error
    assert any(p["field"].startswith(field) for p in error["problems"]), error["problems"]


YAML_CASES = [
    ("5000-deep YAML", "name: w\nsteps:\n  - {id: a, type: noop, input: " + "[" * 5000 + "]" * 5000 + "}\n", "body",
     "nested deeper than 100 levels"),
    ("5000-deep YAML mapping", "name: w\nsteps:\n  - {id: a, type: noop, input: " + "{a: " * 5000 + "1"
     + "}" * 5000 + "}\n", "body", "nested deeper than 100 levels"),
    ("YAML alias bomb", "name: w\nsteps:\n  - {id: a, type: noop, input: {x0: &a0 [1,1,1,1,1,1,1,1,1,1], "
     + "".join(f"x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "], " for i in range(1, 9)) + "y: *a8}}\n",
     "body", "aliases expanded"),
    ("400-bracket expression", "name: w\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop}\n"
     "  - {id: c, type: noop, input: {v: \"${{ " + "[" * 400 + "]" * 400 + " }}\"}}\n", "body.steps[2].input.v",
     "nested deeper than 32 levels"),
    ("lone surrogate in YAML", 'name: w\nsteps:\n  - {id: a, type: noop, input: {v: "\\ud800"}}\n',
     "body.steps[0].input.v", "lone UTF-16 surrogate"),
    ("77-bit integer in YAML", f"name: w\nsteps:\n  - {{id: a, type: noop, input: [{BIG}]}}\n",
     "body.steps[0].input[0]", "64-bit range"),
]


@pytest.mark.parametrize(("case", "text", "field", "words"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_hostile_definitions_are_a_422_naming_the_step_and_field(gateway: Gateway, case: str, text: str,
                                                                 field: str, words: str) -> None:
    r = gateway.client.post("/v1/workflows", content=text.encode(), headers={"content-type": "application/yaml"})
    assert r.status_code == 422, (case, r.status_code, r.text[:500])
    error = r.json()["error"]
    assert words in error["message"] and error["problems"][0]["field"] == field, error
    assert [w["workflow"] for w in gateway.client.get("/v1/workflows").json()["items"]] == ["echo"]  # nothing stored


QUERY_CASES = [
    ("age past year 1 on a bulk replay", "post", "/v1/replays",
     {"filter": {"workflow": "echo", "since": "100000000000000000000h"}, "dry_run": True}, "before year 1"),
    ("age past year 1 on dead letters", "get", "/v1/deadletters?since=100000000000000000000h", None, "query.since"),
    ("age past year 1 on a dead-letter selection", "post", "/v1/deadletters/reprocess",
     {"filter": {"since": "100000000000000000000h"}, "dry_run": True}, "body.filter.since"),
    ("age in an RFC 3339 field", "get", "/v1/executions?since=100000000000000000000h", None, "query.since"),
    ("77-bit limit in a bulk replay filter", "post", "/v1/replays", {"filter": {"workflow": "echo", "limit": BIG}}, "limit"),
    ("a lone surrogate in a query string", "get", "/v1/executions?workflow=%ED%A0%80", None, None),
    ("77-bit offset", "get", f"/v1/deadletters?offset={BIG}", None, "query.offset"),
]


@pytest.mark.parametrize(("case", "method", "path", "body", "words"), QUERY_CASES, ids=[c[0] for c in QUERY_CASES])
def test_hostile_queries_are_answered_without_a_server_error(gateway: Gateway, case: str, method: str, path: str,
                                                             body: Any, words: str | None) -> None:
    r = getattr(gateway.client, method)(path, **({"json": body} if body is not None else {}))
    assert r.status_code < 500, (case, r.status_code, r.text[:500])
    if words is not None:
        assert r.status_code == 422 and words in r.text, r.text[:500]


@pytest.mark.parametrize(("route", "text"), [
    ("/v1/executions", '{"workflow": "echo", "version": 1099511627776}'),
    ("/v1/executions/{eid}/replay", '{"version": 1099511627776}'),
    ("/v1/replays", '{"filter": {"workflow": "echo", "version": 1099511627776}, "dry_run": true}'),
    ("/v1/backfills", '{"workflow": "echo", "version": 1099511627776, "from": "2024-01-01T00:00:00Z",'
                      ' "to": "2024-01-02T00:00:00Z", "dry_run": true}'),
    ("/v1/executions", '{"workflow": "echo", "input": {"msg": 9223372036854775807}}'),
])
def test_integers_within_64_bits_but_past_a_column_are_not_a_server_error(gateway: Gateway, route: str,
                                                                          text: str) -> None:
    r = gateway.json(route, text)
    assert 400 <= r.status_code < 500 or r.status_code in (200, 201), (r.status_code, r.text[:500])


def test_publishing_the_bomb_is_accepted_and_running_it_dead_letters_its_step(gateway: Gateway) -> None:
    c = gateway.client
    for text in (BOMB_IN_INPUT, BOMB_IN_TRANSFORM):
        r = c.post("/v1/workflows", content=text.encode(), headers={"content-type": "application/yaml"})
        assert r.status_code in (200, 201), r.text
    started = time.monotonic()
    blown = c.post("/v1/executions", json={"workflow": "bomb-input", "input": {"v": "x" * 100}}).json()["id"]
    transformed = c.post("/v1/executions", json={"workflow": "bomb-transform", "input": {}}).json()["id"]
    for eid, step, error_type in ((blown, "blow", "ExpressionBudgetError"), (transformed, "blow", "TransformError")):
        done = gateway.finished(eid)
        assert done["status"] == "failed", done
        [blew] = [s for s in done["steps"] if s["step_id"] == step]
        assert blew["status"] == "dead_lettered", blew
        letters = c.get("/v1/deadletters", params={"workflow": done["workflow"]}).json()["items"]
        assert len(letters) == 1, letters
        letter = c.get(f"/v1/deadletters/{letters[0]['id']}").json()
        assert letter["error_type"] == error_type, letter
        assert "creates more than 1000000 elements (the expression budget)" in letter["error_message"], letter
    history = c.get(f"/v1/executions/{transformed}/history").json()["items"]
    attempts = [e for e in history if e["type"] == "StepFailed"]
    assert len(attempts) == 1, attempts  # non-retryable: one attempt of the five allowed
    assert time.monotonic() - started < 20
    # and the stack carries on: a normal execution completes right after
    normal = c.post("/v1/executions", json={"workflow": "echo", "input": {"msg": "still here"}}).json()["id"]
    finished = gateway.finished(normal, timeout=10)
    assert finished["status"] == "completed" and finished["output"] == "still here"
