"""decide() on Undeliverable: a task attempt whose message can never be handled fails its step
non-retryably and dead-letters it, once; anything else about it changes nothing."""

from __future__ import annotations

import pytest

from contracts.deadletters import step_kind
from services.orchestrator.decide import Cancel, DecisionError, Undeliverable, decide
from services.orchestrator.state import Execution
from tests.unit.test_decide import NOW, Run, definition, types

WF = definition({"id": "a"}, {"id": "b", "needs": ["a"]}, {"id": "m", "map": "${{ input.xs }}"})


def gone(step: str = "a", item: int | None = None, attempt: int = 1) -> Undeliverable:
    return Undeliverable(step, item, attempt, "PayloadTooLarge", "StepReady of 2097152 bytes is over the limit")


def test_it_fails_the_step_for_good_and_ends_the_execution() -> None:
    run = Run(WF, {"xs": [1, 2]})
    events = run.do(gone())
    assert types(events) == ["StepFailed", "StepDeadLettered", "ExecutionFailed"]
    failed, letter, end = events
    assert failed.retryable is False and failed.error_type == "PayloadTooLarge"
    assert "2097152" in failed.error_message and letter.error_message == failed.error_message
    assert step_kind(letter.reason) == "non_retryable"
    assert end.error_type == "PayloadTooLarge" and end.step_id == "a"
    assert run.state.status == "failed" and run.status("a") == "dead_lettered"


def test_a_map_item() -> None:
    run = Run(WF, {"xs": [1, 2]})
    events = run.do(gone("m", item=1))
    assert [(e.type, getattr(e, "item", None)) for e in events][:2] == [("StepFailed", 1), ("StepDeadLettered", 1)]


@pytest.mark.parametrize("case", ["twice", "stale attempt", "not scheduled", "unknown step", "finished"])
def test_otherwise_nothing_happens(case: str) -> None:
    run = Run(WF, {"xs": [1]})
    if case == "twice":
        run.do(gone())
        assert run.do(gone()) == []
    elif case == "stale attempt":
        run.fail("a")  # attempt 2 is scheduled now
        assert run.do(gone(attempt=1)) == []
    elif case == "not scheduled":
        assert run.do(gone("b")) == []
    elif case == "unknown step":
        assert run.do(gone("zzz")) == []
    else:
        run.do(Cancel())
        assert run.do(gone()) == []


def test_an_execution_that_does_not_exist() -> None:
    with pytest.raises(DecisionError):
        decide(Execution(id="nope"), gone(), NOW)
