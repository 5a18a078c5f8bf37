"""The console's new entrances under attack, against a real gateway over SQLite and PostgreSQL and
a real NATS: hostile path and query values, an id prefix that must not become a LIKE pattern,
forged cursors, a key bound to one workflow on every new path, rebuilds asked twice (here and by
another holder of the view's claim). Every refusal is a 4xx naming the field and the limit.
The Origin/Host guard and the pages' headers: tests/integration/test_console_guard.py; the live
streams: test_console_streams.py."""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.hostile_support import Gateway, running_gateway, status_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, nats_server: Any) -> Iterator[Gateway]:
    with running_gateway(request, tmp_path_factory.mktemp("console-hostile"), nats_server.url) as gateway:
        yield gateway


def _error(r: Any, status: int, field: str, *words: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:400])
    error = r.json()["error"]
    assert any(p["field"] == field for p in error["problems"]), error
    for w in words:
        assert w in error["message"], error
    return dict(error)


@pytest.mark.parametrize(("n", "words"), [
    ("-1", "greater than or equal to 1"), ("0", "greater than or equal to 1"),
    (str(10**30), "less than or equal to 2147483648"), ("abc", "valid integer"), ("1.5", "valid integer"),
    ("%00", "valid integer"), ("%ff", "valid integer"), ("1e3", "valid integer"), ("%EF%BC%91", "valid integer"),
])
def test_state_as_of_n_refuses_what_is_not_an_event_number(gw: Gateway, n: str, words: str) -> None:
    with gw.client(gw.admin) as c:
        _error(c.get(f"/v1/executions/{gw.mine}/at/{n}"), 422, "path.n", words)


def test_state_as_of_n_holds_the_binding_and_the_id(gw: Gateway) -> None:
    with gw.client(gw.bound) as c:
        assert c.get(f"/v1/executions/{gw.mine}/at/1").status_code == 200
        hidden = c.get(f"/v1/executions/{gw.other}/at/1")  # as if it did not exist
        assert hidden.status_code == 404 and gw.other in hidden.text and "other" not in hidden.text.replace(
            gw.other, "")
    with gw.client(gw.admin) as c:
        assert c.get(f"/v1/executions/{uuid.uuid4()}/at/1").status_code == 404
        _error(c.get(f"/v1/executions/{'a' * 65}/at/1"), 422, "path.execution_id", "at most 64")
        assert c.get("/v1/executions/not-a-uuid/at/1").status_code == 404
    # invalid UTF-8 in the path is refused by the HTTP parser before any code of ours runs
    assert status_of(gw.get_raw(b"/v1/executions/\xff\xfe/at/1", key=gw.admin)) == 400


@pytest.mark.parametrize("prefix", ["%", "_", "a%", "%00", "\x00", "a_b", "\n", "' OR 1=1 --", "\\", "a" * 37])
def test_an_id_prefix_is_never_a_pattern(gw: Gateway, prefix: str) -> None:
    with gw.client(gw.admin) as c:
        r = c.get("/v1/executions", params={"id": prefix})
    words = "at most 36" if len(prefix) > 36 else "hex digits and dashes"
    _error(r, 422, "query.id", words)


def test_an_id_prefix_finds_by_prefix_only_within_the_binding(gw: Gateway) -> None:
    with gw.client(gw.admin) as c:
        found = c.get("/v1/executions", params={"id": gw.other[:8].upper()}).json()["items"]
        assert [x["id"] for x in found] == [gw.other]
        assert c.get("/v1/executions", params={"id": "-"}).json()["items"] == []  # no id starts with a dash
        assert c.get("/v1/executions", params={"id": gw.other}).json()["items"][0]["id"] == gw.other
    with gw.client(gw.bound) as c:
        assert c.get("/v1/executions", params={"id": gw.other[:8]}).json()["items"] == []
        assert c.get("/v1/executions", params={"id": gw.other[:8], "workflow": "other"}).json()["items"] == []
        assert [x["id"] for x in c.get("/v1/executions", params={"id": gw.mine[:8]}).json()["items"]] == [gw.mine]
    # a megabyte of prefix, and bytes that are not UTF-8: refused before the app (400), or by it (422)
    assert status_of(gw.get_raw(b"/v1/executions?id=" + b"a" * (1 << 20), key=gw.admin)) in (0, 400)
    assert status_of(gw.get_raw(b"/v1/executions?id=\xff", key=gw.admin)) == 400
    assert status_of(gw.get_raw(b"/v1/executions?id=%ff%fe", key=gw.admin)) == 422


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_a_forged_cursor_is_refused_or_stays_inside_the_binding(gw: Gateway) -> None:
    with gw.client(gw.admin) as c:
        for forged in ("x", "!!!!", "A" * 512, "%ff%fe", _cursor("2099-01-01T00:00:00|not-a-uuid"),
                       _cursor(f"2099-01-01T00:00:00|urn:uuid:{gw.other}"), _cursor(f"2099-01-01T00:00:00|{{{gw.other}}}"),
                       _cursor(f"not a time|{gw.other}"), base64.urlsafe_b64encode(b"\xff\xfe|x").decode()):
            _error(c.get("/v1/executions", params={"cursor": forged}), 422, "query.cursor", "previous page")
        _error(c.get("/v1/executions", params={"cursor": "A" * 513}), 422, "query.cursor", "at most 512")
    with gw.client(gw.bound) as c:  # a well-formed cursor from far in the future: all the key may see, no more
        page = c.get("/v1/executions", params={"cursor": _cursor(f"2999-01-01T00:00:00+00:00|{gw.other}")}).json()
        assert {x["workflow"] for x in page["items"]} == {"two-steps"}


def test_stats_and_trigger_types_hold_the_binding(gw: Gateway) -> None:
    with gw.client(gw.bound) as c:
        assert c.get("/v1/stats/workflows", params={"workflow": "other"}).json()["items"] == []
        assert {r["workflow"] for r in c.get("/v1/stats/workflows").json()["items"]} <= {"two-steps"}
        assert c.get("/v1/triggers/types").json()["items"] == []  # two-steps subscribes to nothing
        _error(c.get("/v1/stats/workflows", params={"workflow": "w" * 129}), 422, "query.workflow", "at most 128")
    with gw.client(gw.admin) as c:
        [typ] = c.get("/v1/triggers/types").json()["items"]
        assert typ["type"] == "other.happened" and [w["name"] for w in typ["workflows"]] == ["other"]
    with gw.client() as c:
        for path in ("/v1/whoami", "/v1/stats/workflows", "/v1/triggers/types", "/v1/projections",
                     f"/v1/executions/{gw.mine}/at/1", "/v1/changes"):
            assert c.get(path).status_code == 401, path


@pytest.mark.parametrize(("name", "status", "field_or_words"), [
    ("nope", 404, "no view named 'nope' (known: executions"), ("EXEC", 422, "path.name"),
    ("a" * 65, 422, "path.name"), ("executions%00", 422, "path.name"), ("view:..", 422, "path.name"),
])
def test_rebuild_of_an_unknown_or_hostile_name(gw: Gateway, name: str, status: int, field_or_words: str) -> None:
    with gw.client(gw.admin) as c:
        r = c.post(f"/v1/projections/{name}/rebuild")
    assert r.status_code == status and field_or_words in r.text, r.text


def test_rebuild_asked_many_times_at_once_runs_once(gw: Gateway) -> None:
    # Each request gets a rebuild of its own that completes, or a clear 409 while one runs:
    # never two at once (a small view may be rebuilt before the next request arrives).
    answers: list[Any] = []

    def generation(c: Any) -> int:
        return next(int(v["generation"]) for v in c.get("/v1/projections").json()["items"] if v["name"] == "timeline")

    def ask() -> None:
        with gw.client(gw.admin) as c:
            answers.append(c.post("/v1/projections/timeline/rebuild"))

    with gw.client(gw.admin) as c:
        before = generation(c)
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        statuses = sorted(r.status_code for r in answers)
        assert statuses[0] == 202 and set(statuses) <= {202, 409}, statuses
        for r in answers:
            if r.status_code == 409:
                assert r.json()["error"]["code"] == "busy" and "view:timeline" in r.text, r.text
        assert _wait_rebuilt(c, "timeline")["error"] is None
        assert generation(c) - before == statuses.count(202), (before, generation(c), statuses)


def _wait_rebuilt(c: Any, name: str) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + 30
    while True:
        body = c.get(f"/v1/projections/{name}/rebuild").json()
        if not body["running"]:
            return dict(body)
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_rebuild_while_another_holds_the_claim_is_a_409_not_a_202_that_fails(gw: Gateway) -> None:
    # Another gateway (or `weft projections rebuild`) holds the view: its claim is in the store.
    from services.projections.rebuild import _claim, _release

    token = uuid.uuid4().hex
    _claim(gw.stack.store, "view:step_runs", token, 60.0)
    try:
        with gw.client(gw.admin) as c:
            r = c.post("/v1/projections/step_runs/rebuild")
            assert r.status_code == 409 and r.json()["error"]["code"] == "busy", r.text
            assert "a rebuild of view:step_runs is already running" in r.text
    finally:
        _release(gw.stack.store, "view:step_runs", token)
    with gw.client(gw.admin) as c:
        assert c.post("/v1/projections/step_runs/rebuild").status_code == 202
        assert _wait_rebuilt(c, "step_runs")["error"] is None


def test_whoami_with_invalid_utf8_and_huge_headers(gw: Gateway) -> None:
    assert status_of(gw.get_raw(b"/v1/whoami", b"Authorization: Bearer \xff\xfe")) == 401
    assert status_of(gw.get_raw(b"/v1/whoami", b"X-API-Key: " + b"k" * 8000)) == 401
    # headers past the HTTP parser's limit are refused before the app
    assert status_of(gw.get_raw(b"/v1/whoami", b"X-Pad: " + b"p" * (1 << 20), key=gw.admin)) in (0, 400, 431)
