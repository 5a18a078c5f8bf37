"""schemathesis over the gateway's OpenAPI document, with and without a key: no 5xx,
no response outside the schema, bounded (25 examples per operation).

The stack (without workers: nothing generated runs) serves from a thread with its
own event loop, so schemathesis can call it over real HTTP from synchronous tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


schema = schemathesis.openapi.from_dict(_document())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
BOUNDED = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))


@schema.parametrize()
@BOUNDED
def test_with_an_admin_key(case: Any, fuzzed: tuple[str, str]) -> None:
    url, token = fuzzed
    case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, timeout=30)


@schema.parametrize()
@BOUNDED
def test_without_a_key(case: Any, fuzzed: tuple[str, str]) -> None:
    url, _ = fuzzed
    response = case.call_and_validate(base_url=url, checks=CHECKS, timeout=30)
    path = case.operation.path
    if path not in ("/healthz", "/readyz") and not path.startswith("/v1/webhooks/"):
        assert response.status_code in (401, 405, 413), (case.method, path, response.status_code)
