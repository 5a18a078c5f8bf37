"""schemathesis over the gateway's OpenAPI document, with and without a key: no 5xx,
no response outside the schema, bounded (25 examples per operation with a key, 10 without).

Generated data rarely holds what broke the gateway before (issue 13: values nested hundreds of
levels deep, lone UTF-16 surrogates, integers over 64 bits, ages past year 1), so each of those
is also sent as an explicit schemathesis case into every JSON body field and query parameter
that can carry it, through the same checks.

The stack (without workers: nothing generated runs) serves from a thread with its
own event loop, so schemathesis can call it over real HTTP from synchronous tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.generation import GenerationMode

from services.gateway.app import create_app
from services.gateway.keys import Keys
from services.settings import Settings
from tests.support import Background

pytestmark = pytest.mark.integration
PARTS = ("projector", "triggers", "gateway")
CHECKS = [
    checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
    checks.response_schema_conformance, checks.response_headers_conformance, checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, nats_server: Any) -> Iterator[tuple[str, str]]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    settings = Settings(home=tmp, database_url=f"sqlite:///{tmp / 'weft.db'}", nats_url=nats_server.url,
                        namespace=f"f{uuid.uuid4().hex[:8]}", poll_interval=0.05)
    with Background(settings, PARTS) as stack:
        token, _ = Keys(stack.store).create(["admin"], name="fuzz")
        yield stack.gateway.url, token


def _document() -> dict[str, Any]:
    # The document depends on the routes only, so it is built without a running stack; the tests
    # then call the real gateway (schemathesis's lazy from_fixture loader does not run on pytest 9).
    return create_app(None).openapi()  # type: ignore[arg-type]


# /v1/changes is a live feed that never ends by itself (like a running execution's /events): it
# answers by streaming, so a fuzzer's call would only time out. tests/integration/test_console_api.py covers it.
schema = schemathesis.openapi.from_dict(_document()).exclude(path="/v1/changes")
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
BOUNDED = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))
# Without a key nearly everything is a 401 before any parsing: fewer examples find what there is.
KEYLESS = settings(BOUNDED, max_examples=10)


@schema.parametrize()
@BOUNDED
def test_with_an_admin_key(case: Any, fuzzed: tuple[str, str]) -> None:
    url, token = fuzzed
    case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, timeout=30)


@schema.parametrize()
@KEYLESS
def test_without_a_key(case: Any, fuzzed: tuple[str, str]) -> None:
    url, _ = fuzzed
    response = case.call_and_validate(base_url=url, checks=CHECKS, timeout=30)
    path = case.operation.path
    if path not in ("/healthz", "/readyz") and not path.startswith("/v1/webhooks/"):
        assert response.status_code in (401, 405, 413), (case.method, path, response.status_code)


def _nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


# 300 levels: past orjson's 255 (a 500 before), within what the client's json.dumps can write.
HOSTILE: dict[str, Any] = {"deep": _nested(300), "surrogate": "\ud800", "big int": 2**70, "negative big int": -(2**70),
                           "surrogate key": {"\ud800": 1}}
# A valid body per operation, so that the hostile value is what the gateway has to deal with.
BODIES: dict[tuple[str, str], tuple[dict[str, Any], list[str]]] = {
    ("POST", "/v1/executions"): ({"workflow": "fuzzed", "input": {}}, ["input", "version"]),
    ("POST", "/v1/triggers"): ({"type": "fuzz.happened", "data": {}}, ["data", "type", "id", "subject"]),
    ("POST", "/v1/executions/{execution_id}/replay"): ({"input_patch": {}}, ["input_patch", "version", "from_step"]),
    ("POST", "/v1/replays"): ({"filter": {"workflow": "fuzzed"}, "dry_run": True}, ["input_patch", "filter", "version"]),
    ("POST", "/v1/deadletters/reprocess"): ({"ids": ["x"], "dry_run": True}, ["patch", "ids", "why"]),
    ("POST", "/v1/deadletters/discard"): ({"ids": ["x"], "reason": "r", "dry_run": True}, ["reason", "ids"]),
    ("POST", "/v1/workflows"): ({"name": "fuzzed", "steps": [{"id": "a", "type": "noop"}]}, ["steps", "name"]),
    ("POST", "/v1/backfills"): ({"workflow": "fuzzed", "from": "2024-01-01T00:00:00Z", "to": "2024-01-02T00:00:00Z",
                                 "dry_run": True}, ["workflow", "version", "event_type"]),
}
AGES = {"since": "100000000000000000000h", "until": "-100000000000000000000h"}


def _hostile_cases() -> list[Any]:
    cases = []
    for result in schema.get_all_operations():
        op = result.ok()
        path_parameters = {p.name: "EXECUTION" if p.name == "execution_id" else "fuzzed" for p in op.path_parameters}
        base, fields = BODIES.get((op.method.upper(), op.path), (None, []))
        for name in fields:
            for kind, value in HOSTILE.items():
                cases.append(pytest.param(op, path_parameters, {**base, name: value}, {}, id=f"{op.method} {op.path} {name} {kind}"))
        if op.path.endswith("/events") or op.path == "/v1/changes":
            continue  # a live stream of a running execution: it answers by streaming, until it finishes
        for param in op.query:
            for kind, value in {**HOSTILE, "age": AGES.get(param.name, "1")}.items():
                if kind in ("deep", "surrogate key"):
                    continue  # a query value is text
                # requests cannot send a lone surrogate in a URL: its escape as text is what can arrive
                # (tests/integration/test_hostile_http.py sends it percent-encoded, as CESU-8 bytes)
                text = r"\ud800" if kind == "surrogate" else value if isinstance(value, str) else str(value)
                cases.append(pytest.param(op, path_parameters, None, {param.name: text},
                                          id=f"{op.method} {op.path} ?{param.name} {kind}"))
    replays = next(r.ok() for r in schema.get_all_operations() if r.ok().path == "/v1/replays")
    for key, age in AGES.items():
        cases.append(pytest.param(replays, {}, {"filter": {"workflow": "fuzzed", key: age}, "dry_run": True}, {},
                                  id=f"POST /v1/replays filter {key} age"))
    return cases


@pytest.fixture(scope="module")
def execution(fuzzed: tuple[str, str]) -> str:
    """A published workflow `fuzzed` and one execution of it, so hostile values get past the lookups."""
    url, token = fuzzed
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        published = client.post("/v1/workflows", json={"name": "fuzzed", "steps": [{"id": "a", "type": "noop"}]})
        assert published.status_code in (200, 201), published.text
        started = client.post("/v1/executions", json={"workflow": "fuzzed", "input": {}})
        assert started.status_code in (200, 201), started.text
        return str(started.json()["id"])


@pytest.mark.parametrize(("operation", "path_parameters", "body", "query"), _hostile_cases())
def test_hostile_values_in_every_field(operation: Any, path_parameters: dict[str, str], body: Any,
                                       query: dict[str, str], fuzzed: tuple[str, str], execution: str) -> None:
    url, token = fuzzed
    path_parameters = {k: execution if v == "EXECUTION" else v for k, v in path_parameters.items()}
    kwargs: dict[str, Any] = {"path_parameters": path_parameters, "query": query}
    if body is not None:
        kwargs.update(body=body, media_type="application/json")
    case = operation.Case(**kwargs)
    response = case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                                      checks=[c for c in CHECKS if c is not checks.negative_data_rejection])
    assert response.status_code < 500
