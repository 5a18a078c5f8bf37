"""weft.testing: mocks of every kind, the clock, timeouts, and the history it records."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from contracts.definitions import parse_definition
from services.orchestrator.executions import InputError
from weft import NonRetryableError, testing

FLOW = """
name: flow
input_schema: {type: object, required: [n], properties: {n: {type: integer}}}
steps:
  - id: fetch
    type: http
    with: {method: GET, url: "https://example.com/n"}
    retry: {max_attempts: 3, initial_delay: 5, max_delay: 60, multiplier: 2, jitter: false}
    timeout: 10
  - id: double
    type: transform
    needs: [fetch]
    with: {expression: "[n, n]"}
    input: {n: "${{ steps.fetch.output.n }}"}
  - id: wait
    type: sleep
    needs: [double]
    with: {seconds: 3600}
output: "${{ steps.double.output }}"
"""


def test_a_value_mock_and_the_real_transform() -> None:
    result = testing.run(FLOW, {"n": 1}, mocks={"fetch": {"n": 21}})
    assert result.status == "completed" and result.output == [21, 21]
    assert result.clock.now() - testing.Clock.START == timedelta(hours=1)  # the sleep cost no time


def test_retries_wait_out_their_backoff_on_the_clock() -> None:
    result = testing.run(FLOW, {"n": 1}, mocks={"fetch": testing.attempts(ConnectionError("down"), TimeoutError,
                                                                           lambda data, ctx: {"n": ctx.attempt})})
    assert result.status == "completed" and result.output == [3, 3]
    assert result.attempts("fetch") == 3
    scheduled = result.events(type="StepScheduled", step_id="fetch")
    assert [e["reason"] for e in scheduled] == ["ready", "retry", "retry"]
    # backoff 5 s then 10 s (no jitter): the clock moved exactly that much before the third attempt
    assert scheduled[2]["not_before"].startswith("2024-01-01T00:00:15")


def test_an_exception_exhausts_the_retries_and_fails_the_execution() -> None:
    result = testing.run(FLOW, {"n": 1}, mocks={"fetch": ConnectionError("down")})
    assert result.status == "failed"
    assert result.error == {"step_id": "fetch", "type": "ConnectionError", "message": "down"}
    assert result.attempts("fetch") == 3
    assert result.events(type="StepDeadLettered")


def test_a_non_retryable_error_stops_at_once() -> None:
    result = testing.run(FLOW, {"n": 1}, mocks={"fetch": NonRetryableError("bad request")})
    assert result.status == "failed" and result.attempts("fetch") == 1


def test_a_slow_mock_times_out_as_the_worker_would() -> None:
    result = testing.run(FLOW, {"n": 1}, mocks={"fetch": testing.attempts(testing.takes(11, {"n": 1}),
                                                                           testing.takes(9, {"n": 2}))})
    assert result.status == "completed" and result.output == [2, 2]
    failed = result.events(type="StepFailed", step_id="fetch")
    assert failed[0]["error_type"] == "StepTimeout"


async def test_async_function_mocks_and_arun() -> None:
    async def fetch(data: Any, ctx: Any) -> dict[str, Any]:
        return {"n": 5}

    result = await testing.arun(FLOW, {"n": 1}, mocks={"fetch": fetch})
    assert result.output == [5, 5]
    with pytest.raises(testing.HarnessError, match="arun"):
        testing.run(FLOW, {"n": 1})


def test_an_unmocked_network_step_and_a_wrong_mock_name_are_refused() -> None:
    with pytest.raises(testing.HarnessError, match="http step"):
        testing.run(FLOW, {"n": 1})
    with pytest.raises(testing.HarnessError, match="fetchh"):
        testing.run(FLOW, {"n": 1}, mocks={"fetchh": 1})


def test_input_is_checked_against_the_schema() -> None:
    with pytest.raises(InputError, match="n"):
        testing.run(FLOW, {"n": "one"}, mocks={"fetch": {"n": 1}})


def test_the_history_is_what_the_store_holds() -> None:
    result = testing.run(parse_definition(FLOW), {"n": 1}, mocks={"fetch": {"n": 2}})
    types = [e["type"] for e in result.history]
    assert types[0] == "ExecutionStarted" and types[-1] == "ExecutionCompleted"
    assert result.history[0]["workflow"] == "flow"
    assert all(isinstance(e["seq"], int) and "at" in e for e in result.history)


def test_a_runaway_is_stopped_with_a_clear_error() -> None:
    many = """
name: many
steps:
  - {id: a, type: noop, map: "${{ input.items }}"}
"""
    with pytest.raises(testing.HarnessError, match="max_tasks"):
        testing.run(many, {"items": list(range(50))}, max_tasks=10)
    result = testing.run(many, {"items": list(range(2000))})
    assert result.status == "completed" and len(result.calls) == 2000


def test_a_definition_cannot_choose_the_code_the_harness_runs() -> None:
    hostile = """
name: hostile
steps:
  - {id: a, type: python, with: {callable: "posix:system"}, input: "echo pwned", retry: {max_attempts: 1}}
"""
    result = testing.run(hostile)
    assert result.status == "failed" and result.error is not None
    assert result.error["type"] == "CallableNotAllowed"
    # allowed by the caller, a YAML definition's python steps run for real
    own = """
name: own
steps:
  - {id: a, type: python, with: {callable: "tests.integration.steps:positive"}, input: {n: 1}}
output: "${{ steps.a.output }}"
"""
    assert testing.run(own, step_modules=["tests.integration.steps"]).status == "completed"
