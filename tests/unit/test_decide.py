"""Table tests for the DAG rules of the pure core: decide(state, command, now) -> events."""

from __future__ import annotations

import copy
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from contracts.definitions import RetryPolicy, WorkflowDef, parse_definition
from contracts.messages import StepError, StepResult
from services.orchestrator.backoff import backoff
from services.orchestrator.decide import (
    Cancel,
    DecisionError,
    Pause,
    Reprocess,
    Resume,
    Retry,
    Start,
    UnknownTask,
    decide,
    merge_patch,
)
from services.orchestrator.state import Execution, evolve, fold

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
EID = "ex-1"
NO_JITTER = {"max_attempts": 3, "initial_delay": 1, "max_delay": 10, "multiplier": 2, "jitter": False}


def definition(*steps: dict[str, Any], output: Any = None) -> WorkflowDef:
    body: dict[str, Any] = {"name": "wf", "steps": [{"type": "noop", **s} for s in steps]}
    if output is not None:
        body["output"] = output
    return parse_definition(body)


class Run:
    """An execution driven through decide(), keeping the history like the store would."""

    def __init__(self, wf: WorkflowDef, input: Any = None, *, eid: str = EID, start_hash: str | None = None, **start: Any):
        self.wf = wf
        self.state = Execution(id=eid)
        self.history: list[Any] = []
        self.last = self.do(Start(wf, 1, start_hash or wf.content_hash(), input=input, **start))

    def do(self, command: Any, now: datetime = NOW) -> list[Any]:
        events = decide(self.state, command, now)
        for e in events:
            evolve(self.state, e)
        self.history.extend(events)
        self.last = events
        return events

    def ok(self, step: str, output: Any = None, *, attempt: int = 1, item: int | None = None) -> list[Any]:
        return self.do(result(step, "succeeded", output=output, attempt=attempt, item=item))

    def fail(self, step: str, etype: str = "Boom", *, attempt: int = 1, item: int | None = None, **err: Any) -> list[Any]:
        return self.do(result(step, "failed", attempt=attempt, item=item, error=StepError(type=etype, message="it broke", **err)))

    def status(self, step: str) -> str:
        return self.state.steps[step].status


def result(step: str, status: str, *, attempt: int = 1, item: int | None = None, eid: str = EID, **kw: Any) -> StepResult:
    return StepResult(execution_id=eid, step_id=step, item=item, attempt=attempt, status=status, **kw)  # type: ignore[arg-type]


def types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


def scheduled(events: list[Any]) -> list[tuple[str, int | None, int]]:
    return [(e.step_id, e.item, e.attempt) for e in events if e.type == "StepScheduled"]


def of(events: list[Any], kind: str) -> list[Any]:
    return [e for e in events if e.type == kind]


def _error(outcome: str) -> StepError | None:
    return StepError(type="E", message="m") if outcome == "failed" else None


# ---- scheduling along the DAG ------------------------------------------------------------

LINEAR = [{"id": "a"}, {"id": "b", "needs": ["a"]}, {"id": "c", "needs": ["b"]}]
DIAMOND = [{"id": "a"}, {"id": "b", "needs": ["a"]}, {"id": "c", "needs": ["a"]}, {"id": "d", "needs": ["b", "c"]}]
TWO_ROOTS = [{"id": "a"}, {"id": "b"}, {"id": "c", "needs": ["a", "b"]}]


@pytest.mark.parametrize(
    ("steps", "roots"),
    [
        (LINEAR, ["a"]),
        (DIAMOND, ["a"]),
        (TWO_ROOTS, ["a", "b"]),
        ([{"id": "x"}, {"id": "y"}, {"id": "z"}], ["x", "y", "z"]),
    ],
    ids=["linear", "diamond", "two-roots", "independent"],
)
def test_roots_are_scheduled_at_start(steps: list[dict[str, Any]], roots: list[str]) -> None:
    run = Run(definition(*steps), {"k": 1})
    assert types(run.last)[0] == "ExecutionStarted"
    assert scheduled(run.last) == [(r, None, 1) for r in roots]
    for e in of(run.last, "StepScheduled"):
        assert e.input == {"k": 1}  # no input mapping: the execution input
        assert e.reason == "ready" and e.not_before is None


@pytest.mark.parametrize(
    ("steps", "done", "expect"),
    [
        (LINEAR, ["a"], ["b"]),
        (LINEAR, ["a", "b"], ["c"]),
        (DIAMOND, ["a"], ["b", "c"]),
        (DIAMOND, ["a", "b"], []),  # d still waits for c
        (DIAMOND, ["a", "c"], []),
        (DIAMOND, ["a", "c", "b"], ["d"]),
        (TWO_ROOTS, ["a"], []),
        (TWO_ROOTS, ["b", "a"], ["c"]),
    ],
)
def test_a_step_is_scheduled_only_when_all_its_needs_succeeded(
    steps: list[dict[str, Any]], done: list[str], expect: list[str]
) -> None:
    run = Run(definition(*steps))
    for sid in done:
        run.ok(sid, sid.upper())
    assert [sid for sid, _, _ in scheduled(run.last)] == expect


def test_a_failed_parent_blocks_its_children_until_it_succeeds() -> None:
    run = Run(definition(*LINEAR))
    run.fail("a")
    assert scheduled(run.last) == [("a", None, 2)]
    assert run.status("b") == "pending"
    run.ok("a", attempt=2)
    assert scheduled(run.last) == [("b", None, 1)]


def test_parent_outputs_flow_into_the_input_mapping() -> None:
    run = Run(
        definition({"id": "a"}, {"id": "b", "needs": ["a"], "input": {"n": "${{ steps.a.output.n }}", "q": "${{ input.q }}"}}),
        {"q": "Q"},
    )
    run.ok("a", {"n": 7})
    assert of(run.last, "StepScheduled")[0].input == {"n": 7, "q": "Q"}


def test_a_run_to_completion_with_the_definitions_output() -> None:
    run = Run(definition(*DIAMOND, output={"b": "${{ steps.b.output }}", "sum": "${{ sum([steps.b.output, steps.c.output]) }}"}))
    run.ok("a", 1)
    run.ok("b", 2)
    run.ok("c", 3)
    run.ok("d", 4)
    assert types(run.last) == ["StepSucceeded", "ExecutionCompleted"]
    assert run.last[-1].output == {"b": 2, "sum": 5}
    assert run.state.status == "completed" and run.state.output == {"b": 2, "sum": 5}


def test_without_an_output_expression_the_output_is_null() -> None:
    run = Run(definition({"id": "a"}))
    run.ok("a", "x")
    assert of(run.last, "ExecutionCompleted")[0].output is None


def test_an_output_expression_that_fails_fails_the_execution() -> None:
    run = Run(definition({"id": "a"}, output="${{ abs(steps.a.output) }}"))
    run.ok("a", "not a number")
    assert types(run.last) == ["StepSucceeded", "ExecutionFailed"]
    assert run.last[-1].error_type == "ExpressionError"
    assert run.state.status == "failed"


# ---- when / skip ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "output", "skipped"),
    [
        ("${{ steps.a.output.ok }}", {"ok": True}, False),
        ("${{ steps.a.output.ok }}", {"ok": False}, True),
        ("${{ steps.a.output.ok }}", {}, True),  # missing -> null -> false
        ("${{ steps.a.output.items }}", {"items": []}, True),
        ("${{ steps.a.output.items }}", {"items": [0]}, False),
        ("${{ steps.a.output.n }}", {"n": 0}, False),  # JMESPath: 0 is true
        ("${{ steps.a.output.s }}", {"s": ""}, True),
        ("${{ steps.a.output.n > `2` }}", {"n": 3}, False),
        ("${{ steps.a.output.n > `2` }}", {"n": 2}, True),
    ],
)
def test_when_false_skips_the_step(when: str, output: Any, skipped: bool) -> None:
    run = Run(definition({"id": "a"}, {"id": "b", "needs": ["a"], "when": when}))
    run.ok("a", output)
    if skipped:
        assert types(run.last) == ["StepSucceeded", "StepSkipped", "ExecutionCompleted"]
        assert run.last[1].reason.startswith("when was false")
        assert run.status("b") == "skipped"
    else:
        assert scheduled(run.last) == [("b", None, 1)]


def test_a_root_step_with_a_false_when_is_skipped_at_start() -> None:
    run = Run(definition({"id": "a", "when": "${{ input.go }}"}, {"id": "b"}), {"go": False})
    assert types(run.last) == ["ExecutionStarted", "StepSkipped", "StepScheduled"]


SKIP_DAG = [
    {"id": "a"},
    {"id": "b", "needs": ["a"], "when": "${{ steps.a.output.go }}"},
    {"id": "c", "needs": ["b"]},  # only skipped parents -> skipped
    {"id": "d", "needs": ["c"]},  # transitively skipped
    {"id": "e", "needs": ["a", "b"]},  # one skipped, one succeeded -> runs
    {"id": "f", "needs": ["e", "d"]},
]


def test_steps_needing_only_skipped_steps_are_skipped_but_a_mixed_parent_set_runs() -> None:
    run = Run(definition(*SKIP_DAG))
    run.ok("a", {"go": False})
    assert [e.step_id for e in of(run.last, "StepSkipped")] == ["b", "c", "d"]
    assert of(run.last, "StepSkipped")[1].reason == "all parents skipped"
    assert scheduled(run.last) == [("e", None, 1)]
    run.ok("e")
    assert scheduled(run.last) == [("f", None, 1)]  # e succeeded, d skipped
    run.ok("f")
    assert run.state.status == "completed"


def test_all_steps_skipped_completes_the_execution() -> None:
    run = Run(definition({"id": "a", "when": "${{ input.go }}"}, {"id": "b", "needs": ["a"]}), {"go": False})
    assert types(run.last) == ["ExecutionStarted", "StepSkipped", "StepSkipped", "ExecutionCompleted"]


def test_a_skipped_steps_output_is_null_downstream() -> None:
    run = Run(
        definition(
            {"id": "a", "when": "${{ input.go }}"},
            {"id": "b"},
            {"id": "c", "needs": ["a", "b"], "input": {"a": "${{ steps.a.output }}", "sa": "${{ steps.a.status }}"}},
        ),
        {"go": False},
    )
    run.ok("b")
    assert of(run.last, "StepScheduled")[0].input == {"a": None, "sa": "skipped"}


# ---- map fan-out ------------------------------------------------------------------------------

MAP = [
    {"id": "a"},
    {"id": "m", "needs": ["a"], "map": "${{ steps.a.output }}", "input": {"x": "${{ item }}", "q": "${{ input.q }}"}},
    {"id": "z", "needs": ["m"], "input": "${{ steps.m.output }}"},
]


@pytest.mark.parametrize("items", [[1], ["a", "b", "c"], [{"k": 1}, None, [2]]])
def test_map_schedules_one_task_per_item_with_the_item_bound(items: list[Any]) -> None:
    run = Run(definition(*MAP), {"q": "Q"})
    run.ok("a", items)
    assert types(run.last)[:2] == ["StepSucceeded", "StepMapped"]
    assert run.last[1].count == len(items)
    assert scheduled(run.last) == [("m", i, 1) for i in range(len(items))]
    assert [e.input for e in of(run.last, "StepScheduled")] == [{"x": it, "q": "Q"} for it in items]
    assert len({e.idempotency_key for e in of(run.last, "StepScheduled")}) == len(items)


def test_map_without_an_input_mapping_passes_the_item_itself() -> None:
    run = Run(definition({"id": "a"}, {"id": "m", "needs": ["a"], "map": "${{ steps.a.output }}"}))
    run.ok("a", [{"i": 0}, {"i": 1}])
    assert [e.input for e in of(run.last, "StepScheduled")] == [{"i": 0}, {"i": 1}]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_map_outputs_are_gathered_in_item_order_whatever_order_results_come_in(order: list[int]) -> None:
    run = Run(definition(*MAP))
    run.ok("a", ["x", "y", "z"])
    for n, i in enumerate(order):
        run.ok("m", f"out{i}", item=i)
        if n < len(order) - 1:
            assert scheduled(run.last) == [] and run.status("m") == "scheduled"
    assert of(run.last, "StepSucceeded")[-1].output == ["out0", "out1", "out2"]
    assert of(run.last, "StepScheduled")[0].input == ["out0", "out1", "out2"]
    assert run.state.steps["m"].output == ["out0", "out1", "out2"]


def test_map_over_an_empty_list_succeeds_with_an_empty_list() -> None:
    run = Run(definition(*MAP))
    run.ok("a", [])
    assert types(run.last) == ["StepSucceeded", "StepMapped", "StepSucceeded", "StepScheduled"]
    assert run.last[2].output == [] and run.last[1].count == 0
    assert of(run.last, "StepScheduled")[0].input == []


def test_map_over_something_that_is_not_a_list_dead_letters_the_step() -> None:
    run = Run(definition(*MAP))
    run.ok("a", {"not": "a list"})
    assert types(run.last) == ["StepSucceeded", "StepDeadLettered", "ExecutionFailed"]
    assert run.last[1].error_type == "ExpressionError" and "list" in run.last[1].error_message


def test_a_map_item_retries_alone() -> None:
    run = Run(definition(*MAP[:2]))
    run.ok("a", [1, 2])
    run.fail("m", item=1)
    assert scheduled(run.last) == [("m", 1, 2)]
    assert of(run.last, "StepScheduled")[0].input == {"x": 2, "q": None}
    run.ok("m", "r0", item=0)
    run.ok("m", "r1", item=1, attempt=2)
    assert run.state.status == "completed" and run.state.steps["m"].output == ["r0", "r1"]


def test_a_result_for_a_map_item_that_does_not_exist_is_unknown() -> None:
    run = Run(definition(*MAP))
    run.ok("a", [1])
    with pytest.raises(UnknownTask):
        run.ok("m", item=5)
    with pytest.raises(UnknownTask):
        run.ok("m", item=None)


# ---- retries, backoff and dead letters ------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "failures", "expected"),
    [
        (NO_JITTER, 1, 1.0),
        (NO_JITTER, 2, 2.0),
        ({**NO_JITTER, "max_attempts": 10}, 4, 8.0),
        ({**NO_JITTER, "max_attempts": 10}, 6, 10.0),  # capped
        ({**NO_JITTER, "initial_delay": 0}, 1, None),  # no wait: not_before stays empty
    ],
)
def test_a_retry_waits_out_its_backoff(policy: dict[str, Any], failures: int, expected: float | None) -> None:
    run = Run(definition({"id": "a", "retry": policy}))
    for attempt in range(1, failures + 1):
        run.fail("a", attempt=attempt)
    retry = of(run.last, "StepScheduled")[0]
    assert (retry.attempt, retry.reason) == (failures + 1, "retry")
    assert retry.not_before == (None if expected is None else NOW + timedelta(seconds=expected))
    assert retry.idempotency_key == f"{EID}:a"


def test_a_jittered_retry_uses_the_backoff_function_of_the_task_key() -> None:
    policy = {"max_attempts": 5, "initial_delay": 4, "max_delay": 100, "multiplier": 3, "jitter": True}
    run = Run(definition({"id": "a", "retry": policy}))
    run.fail("a")
    run.fail("a", attempt=2)
    delay = backoff(RetryPolicy(**policy), 2, f"{EID}:a")
    assert 6 <= delay < 12
    assert of(run.last, "StepScheduled")[0].not_before == NOW + timedelta(seconds=delay)


@pytest.mark.parametrize(("asked", "waited"), [(3.5, 3.5), (1000, 10), (0, None)])
def test_a_handler_asked_retry_delay_wins_but_is_capped(asked: float, waited: float | None) -> None:
    run = Run(definition({"id": "a", "retry": NO_JITTER}))
    run.fail("a", next_retry_delay=asked)
    assert of(run.last, "StepFailed")[0].next_retry_delay == asked
    expected = None if waited is None else NOW + timedelta(seconds=waited)
    assert of(run.last, "StepScheduled")[0].not_before == expected


@pytest.mark.parametrize("max_attempts", [1, 2, 4])
def test_exhausting_max_attempts_dead_letters_and_fails_the_execution(max_attempts: int) -> None:
    run = Run(definition({"id": "a", "retry": {**NO_JITTER, "max_attempts": max_attempts}}, {"id": "b", "needs": ["a"]}))
    for attempt in range(1, max_attempts):
        run.fail("a", attempt=attempt)
        assert types(run.last) == ["StepFailed", "StepScheduled"] and run.last[0].retryable
    run.fail("a", "Kaput", attempt=max_attempts)
    assert types(run.last) == ["StepFailed", "StepDeadLettered", "ExecutionFailed"]
    failed, dead, ex = run.last
    assert not failed.retryable
    assert (dead.step_id, dead.attempt, dead.error_type, dead.error_message) == ("a", max_attempts, "Kaput", "it broke")
    assert "exhausted" in dead.reason
    assert (ex.step_id, ex.error_type) == ("a", "Kaput")
    assert run.state.status == "failed" and run.status("a") == "dead_lettered" and run.status("b") == "pending"


@pytest.mark.parametrize(
    ("policy_non_retryable", "etype", "flag", "dead"),
    [
        ((), "Boom", True, True),
        (("ValueError",), "ValueError", False, True),
        (("ValueError", "KeyError"), "KeyError", False, True),
        (("ValueError",), "TypeError", False, False),
        ((), "Boom", False, False),
    ],
)
def test_a_non_retryable_error_dead_letters_at_once(
    policy_non_retryable: tuple[str, ...], etype: str, flag: bool, dead: bool
) -> None:
    run = Run(definition({"id": "a", "retry": {**NO_JITTER, "max_attempts": 5, "non_retryable": list(policy_non_retryable)}}))
    run.fail("a", etype, non_retryable=flag)
    if dead:
        assert types(run.last) == ["StepFailed", "StepDeadLettered", "ExecutionFailed"]
        assert run.last[1].reason == "non-retryable error" and run.last[0].retryable is False
    else:
        assert types(run.last) == ["StepFailed", "StepScheduled"]


def test_a_failure_without_error_details_is_still_recorded() -> None:
    run = Run(definition({"id": "a", "retry": {**NO_JITTER, "max_attempts": 1}}))
    run.do(result("a", "failed"))
    assert types(run.last) == ["StepFailed", "StepDeadLettered", "ExecutionFailed"]
    assert run.last[0].error_type == "UnknownError"


@pytest.mark.parametrize(
    ("steps", "reason"),
    [
        ([{"id": "a", "input": {"x": "${{ abs(input.s) }}"}}], "input"),
        ([{"id": "a", "when": "${{ abs(input.s) }}"}], "when"),
        ([{"id": "a", "map": "${{ abs(input.s) }}"}], "map"),
        ([{"id": "a", "map": "${{ input.list }}", "input": "${{ abs(item) }}"}], "map input"),
    ],
)
def test_an_expression_error_at_schedule_time_dead_letters_the_step(steps: list[dict[str, Any]], reason: str) -> None:
    run = Run(definition(*steps), {"s": "text", "list": ["x"]})
    assert types(run.last) == ["ExecutionStarted", "StepDeadLettered", "ExecutionFailed"], reason
    dead = run.last[1]
    assert (dead.step_id, dead.error_type, dead.reason) == ("a", "ExpressionError", "input error")
    assert run.state.status == "failed"


BOMB = "${{ input.v" + " | [@,@]" * 40 + " }}"  # 2^40 elements if it were ever built (issue 13)


@pytest.mark.parametrize(
    "step",
    [
        {"id": "a", "input": {"v": BOMB}},
        {"id": "a", "when": BOMB},
        {"id": "a", "map": "${{ input.list }}", "input": {"v": BOMB.replace("input.v", "item")}},
    ],
    ids=["input", "when", "map input"],
)
def test_an_expression_over_its_budget_dead_letters_the_step_at_once(step: dict[str, Any]) -> None:
    started = time.perf_counter()
    run = Run(definition(step), {"v": 1, "list": [1, 2, 3]})
    assert time.perf_counter() - started < 2
    assert types(run.last)[1:] == ["StepDeadLettered", "ExecutionFailed"]
    dead = run.last[1]
    assert (dead.error_type, dead.reason) == ("ExpressionBudgetError", "input error")
    assert "creates more than 1000000 elements" in dead.error_message


def test_an_output_over_its_budget_fails_the_execution() -> None:
    run = Run(definition({"id": "a"}, output=BOMB), {"v": 1})
    run.do(result("a", "succeeded", output=1))
    assert types(run.last)[-1] == "ExecutionFailed"
    assert run.last[-1].error_type == "ExpressionBudgetError" and "elements" in run.last[-1].error_message


def test_a_map_over_10000_items_fits_the_budget() -> None:
    run = Run(definition({"id": "a", "map": "${{ input.items }}", "input": {"sku": "${{ item.sku }}", "n": "${{ [item.n] }}"}}),
              {"items": [{"sku": f"s{i}", "n": i} for i in range(10_000)]})
    scheduled = [e for e in run.last if e.type == "StepScheduled"]
    assert len(scheduled) == 10_000 and scheduled[-1].input == {"sku": "s9999", "n": [9999]}


# ---- duplicates, stale and late results -----------------------------------------------------


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_a_duplicate_result_produces_no_events(status: str) -> None:
    run = Run(definition({"id": "a", "retry": NO_JITTER}, {"id": "b", "needs": ["a"]}))
    assert run.do(result("a", status, error=_error(status)))
    before = run.state.copy()
    assert run.do(result("a", status, output="other", error=_error(status))) == []
    # a different outcome for the same attempt is a duplicate as well: one result per attempt
    other = "failed" if status == "succeeded" else "succeeded"
    assert run.do(result("a", other, error=_error(other))) == []
    assert run.state == before


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
@pytest.mark.parametrize("attempt", [0, 1, 3, 7])
def test_a_result_for_an_attempt_that_is_not_current_is_ignored_as_stale(outcome: str, attempt: int) -> None:
    run = Run(definition({"id": "a", "retry": NO_JITTER}, {"id": "b", "needs": ["a"]}))
    run.fail("a")  # attempt 1 recorded as failed, attempt 2 is current
    events = run.do(result("a", outcome, attempt=attempt, error=_error(outcome)))
    if attempt == 1:
        assert events == []  # attempt 1 already has its result: a duplicate
    else:
        assert types(events) == ["StepResultIgnored"]
        assert (events[0].reason, events[0].outcome, events[0].attempt) == ("stale attempt", outcome, attempt)
        assert run.do(result("a", outcome, attempt=attempt, error=_error(outcome))) == []  # recorded once
    assert run.status("a") == "scheduled" and run.state.steps["a"].tasks[None].attempt == 2
    assert types(run.ok("a", attempt=2)) == ["StepSucceeded", "StepScheduled"]


def test_a_task_in_flight_when_the_execution_failed_is_resumed_by_a_retry() -> None:
    run = Run(definition({"id": "a"}, {"id": "b", "retry": {**NO_JITTER, "max_attempts": 1}}))
    run.fail("b")  # the execution fails while a is in flight
    assert run.state.status == "failed"
    late = run.ok("a", "late")
    assert types(late) == ["StepResultIgnored"] and late[0].reason == "execution failed"
    events = run.do(Retry())
    assert [(e.step_id, e.attempt, e.reason) for e in of(events, "StepScheduled")] == [("a", 2, "resume"), ("b", 2, "reprocess")]
    assert run.ok("a", "late again") == []  # attempt 1 stays recorded as ignored
    run.ok("a", attempt=2)
    run.ok("b", attempt=2)
    assert run.state.status == "completed"


def test_a_task_still_in_flight_at_retry_keeps_its_attempt() -> None:
    run = Run(definition({"id": "a"}, {"id": "b", "retry": {**NO_JITTER, "max_attempts": 1}}))
    run.fail("b")
    events = run.do(Retry())  # a's result has not come yet: no new attempt for it
    assert scheduled(events) == [("b", None, 2)]
    assert types(run.ok("a")) == ["StepSucceeded"]
    run.ok("b", attempt=2)
    assert run.state.status == "completed"


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_a_result_after_cancel_is_ignored_with_a_reason(outcome: str) -> None:
    run = Run(definition({"id": "a"}, {"id": "b", "needs": ["a"]}))
    run.do(Cancel(why="no longer needed"))
    assert types(run.last) == ["ExecutionCancelled"] and run.last[0].why == "no longer needed"
    events = run.do(result("a", outcome, error=_error(outcome)))
    assert types(events) == ["StepResultIgnored"]
    assert (events[0].reason, events[0].outcome, events[0].attempt) == ("execution cancelled", outcome, 1)
    assert run.state.status == "cancelled" and run.status("b") == "pending"
    assert run.do(result("a", outcome, error=_error(outcome))) == []


def test_a_result_for_an_unknown_step_raises_unknown_task() -> None:
    run = Run(definition({"id": "a"}, {"id": "b", "needs": ["a"]}))
    with pytest.raises(UnknownTask) as info:
        run.ok("nope")
    assert info.value.code == "unknown_task"
    with pytest.raises(UnknownTask):
        run.ok("b")  # known step, but nothing scheduled for it yet
    assert isinstance(info.value, DecisionError)


# ---- pause / resume / cancel ---------------------------------------------------------------


def test_pause_stops_scheduling_but_results_are_recorded_and_resume_catches_up() -> None:
    run = Run(definition({"id": "a"}, {"id": "b", "retry": NO_JITTER}, {"id": "c", "needs": ["a"]}))
    assert types(run.do(Pause(why="deploy"))) == ["ExecutionPaused"]
    assert run.do(Pause()) == []  # already paused
    assert types(run.ok("a", 1)) == ["StepSucceeded"]
    assert types(run.fail("b")) == ["StepFailed"]  # no retry while paused
    assert run.status("c") == "pending" and run.state.status == "paused"
    later = NOW + timedelta(minutes=5)
    events = run.do(Resume(), later)
    assert types(events) == ["ExecutionResumed", "StepScheduled", "StepScheduled"]
    retry, ready = events[1], events[2]
    assert (retry.step_id, retry.attempt, retry.reason, retry.not_before) == ("b", 2, "retry", later + timedelta(seconds=1))
    assert (ready.step_id, ready.attempt, ready.reason) == ("c", 1, "ready")
    assert run.do(Resume()) == []  # already running


def test_a_paused_execution_completes_only_after_resume() -> None:
    run = Run(definition({"id": "a"}))
    run.do(Pause())
    run.ok("a")
    assert run.state.status == "paused"
    assert types(run.do(Resume())) == ["ExecutionResumed", "ExecutionCompleted"]


def test_a_dead_letter_while_paused_fails_the_execution() -> None:
    run = Run(definition({"id": "a", "retry": {**NO_JITTER, "max_attempts": 1}}))
    run.do(Pause())
    assert types(run.fail("a")) == ["StepFailed", "StepDeadLettered", "ExecutionFailed"]
    assert run.state.status == "failed"


def test_a_paused_execution_can_be_cancelled() -> None:
    run = Run(definition({"id": "a"}))
    run.do(Pause())
    assert types(run.do(Cancel())) == ["ExecutionCancelled"]


@pytest.mark.parametrize(
    ("setup", "command", "code"),
    [
        ("new", Cancel(), "not_found"),
        ("new", Pause(), "not_found"),
        ("new", Retry(), "not_found"),
        ("new", Reprocess("a"), "not_found"),
        ("completed", Cancel(), "finished"),
        ("failed", Cancel(), "finished"),
        ("cancelled", Cancel(), "finished"),
        ("completed", Pause(), "not_running"),
        ("failed", Pause(), "not_running"),
        ("cancelled", Pause(), "not_running"),
        ("running", Resume(), None),
        ("completed", Resume(), "not_paused"),
        ("cancelled", Resume(), "not_paused"),
        ("running", Retry(), "not_failed"),
        ("paused", Retry(), "not_failed"),
        ("completed", Retry(), "not_failed"),
        ("cancelled", Retry(), "not_failed"),
        ("failed", Reprocess("nope"), "unknown_step"),
        ("failed", Reprocess("a", item=3), "unknown_step"),
    ],
)
def test_control_commands_on_the_wrong_status_raise_with_a_code(setup: str, command: Any, code: str | None) -> None:
    wf = definition({"id": "a", "retry": {**NO_JITTER, "max_attempts": 1}})
    state = Execution(id=EID)
    if setup != "new":
        run = Run(wf)
        if setup == "completed":
            run.ok("a")
        elif setup == "failed":
            run.fail("a")
        elif setup == "cancelled":
            run.do(Cancel())
        elif setup == "paused":
            run.do(Pause())
        state = run.state
        assert state.status == setup
    if code is None:
        assert decide(state, command, NOW) == []
        return
    with pytest.raises(DecisionError) as info:
        decide(state, command, NOW)
    assert info.value.code == code


def test_a_second_start_is_a_no_op() -> None:
    run = Run(definition({"id": "a"}))
    assert run.do(Start(run.wf, 1, run.wf.content_hash())) == []


# ---- retry and reprocess of a finished execution --------------------------------------------


def test_retry_reruns_dead_lettered_tasks_and_keeps_succeeded_outputs() -> None:
    run = Run(
        definition(
            {"id": "a"},
            {"id": "b", "needs": ["a"], "retry": {**NO_JITTER, "max_attempts": 2}},
            {"id": "c", "needs": ["b"], "input": {"a": "${{ steps.a.output }}", "b": "${{ steps.b.output }}"}},
        )
    )
    run.ok("a", "A")
    run.fail("b", attempt=1)
    run.fail("b", attempt=2)
    assert run.state.status == "failed"
    events = run.do(Retry(why="fixed the bug"))
    assert types(events) == ["ExecutionRetried", "StepScheduled"]
    assert (events[1].step_id, events[1].attempt, events[1].reason) == ("b", 3, "reprocess")
    assert events[1].idempotency_key == f"{EID}:b"
    assert run.state.status == "running" and run.state.error is None
    assert run.status("a") == "succeeded" and run.state.steps["a"].output == "A"
    # the retry gets a fresh budget: one more failure is retried, not dead-lettered
    assert types(run.fail("b", attempt=3)) == ["StepFailed", "StepScheduled"]
    run.ok("b", "B", attempt=4)
    assert of(run.last, "StepScheduled")[0].input == {"a": "A", "b": "B"}
    run.ok("c")
    assert run.state.status == "completed"
    assert types(run.history).count("ExecutionStarted") == 1


def test_retry_of_a_failed_map_reruns_the_dead_item_and_the_orphans() -> None:
    run = Run(definition({"id": "a"}, {"id": "m", "needs": ["a"], "map": "${{ steps.a.output }}", "retry": {**NO_JITTER, "max_attempts": 1}}))
    run.ok("a", [10, 20, 30])
    run.ok("m", "r0", item=0)
    run.fail("m", item=1)  # dead letter: execution failed while item 2 is in flight
    assert types(run.ok("m", "late", item=2)) == ["StepResultIgnored"]
    events = run.do(Retry())
    assert sorted(scheduled(events)) == [("m", 1, 2), ("m", 2, 2)]
    run.ok("m", "r1", item=1, attempt=2)
    run.ok("m", "r2", item=2, attempt=2)
    assert run.state.status == "completed" and run.state.steps["m"].output == ["r0", "r1", "r2"]


def test_retry_of_an_expression_failure_schedules_the_step_again() -> None:
    run = Run(definition({"id": "a", "input": "${{ abs(input.s) }}"}), {"s": "x"})
    assert run.state.status == "failed"
    events = run.do(Retry())
    # the definition is immutable, so the same expression fails again
    assert types(events) == ["ExecutionRetried", "StepDeadLettered", "ExecutionFailed"]


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        ({"a": 1, "b": 2}, {"b": 3}, {"a": 1, "b": 3}),
        ({"a": 1, "b": 2}, {"b": None}, {"a": 1}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"y": None, "z": 3}}, {"a": {"x": 1, "z": 3}}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
        ("text", {"a": 1}, {"a": 1}),
        ({"a": 1}, ["x"], ["x"]),
        ({"a": {"b": 1}}, {"a": "flat"}, {"a": "flat"}),
        (None, {"a": {"b": None}}, {"a": {}}),
        ({}, {}, {}),
    ],
)
def test_merge_patch_follows_rfc_7386(target: Any, patch: Any, expected: Any) -> None:
    before = copy.deepcopy(target)
    assert merge_patch(target, patch) == expected
    assert target == before


def test_reprocess_applies_a_merge_patch_keeps_the_key_and_runs_to_completion() -> None:
    run = Run(
        definition(
            {"id": "a", "input": {"order": "${{ input.order }}", "mode": "fast", "opts": {"x": 1}}, "retry": {**NO_JITTER, "max_attempts": 1}},
            {"id": "b", "needs": ["a"]},
        ),
        {"order": 7},
    )
    run.fail("a")
    assert run.state.status == "failed"
    patch = {"mode": None, "opts": {"y": 2}, "extra": True}
    events = run.do(Reprocess("a", patch=patch, why="fix", request_id="r-1"))
    assert types(events) == ["StepReprocessRequested", "StepScheduled"]
    assert events[0].patch == patch and events[0].request_id == "r-1"
    sched = events[1]
    assert sched.input == {"order": 7, "opts": {"x": 1, "y": 2}, "extra": True}
    assert (sched.attempt, sched.reason, sched.idempotency_key) == (2, "reprocess", f"{EID}:a")
    assert run.state.status == "running"
    # the same request again (or a second click) does not make a second attempt
    assert run.do(Reprocess("a", patch=patch, request_id="r-1")) == []
    assert run.do(Reprocess("a")) == []
    run.ok("a", attempt=2)
    run.ok("b")
    assert run.state.status == "completed"
    assert types(run.history).count("StepScheduled") == 3


def test_reprocess_of_a_map_item_reruns_only_that_item() -> None:
    run = Run(definition({"id": "a"}, {"id": "m", "needs": ["a"], "map": "${{ steps.a.output }}", "input": {"v": "${{ item }}"}, "retry": {**NO_JITTER, "max_attempts": 1}}))
    run.ok("a", [1, 2])
    run.ok("m", "r0", item=0)
    run.fail("m", item=1)
    events = run.do(Reprocess("m", item=1, patch={"v": 99}))
    assert scheduled(events) == [("m", 1, 2)] and events[1].input == {"v": 99}
    assert events[1].idempotency_key == f"{EID}:m#1"
    run.ok("m", "r1", item=1, attempt=2)
    assert run.state.status == "completed" and run.state.steps["m"].output == ["r0", "r1"]


def test_reprocess_of_a_step_that_is_not_dead_lettered_does_nothing() -> None:
    run = Run(definition({"id": "a"}, {"id": "b"}))
    run.ok("a")
    assert run.do(Reprocess("a")) == []
    assert run.do(Reprocess("b")) == []


def test_reprocess_of_an_expression_failure_tries_the_step_again() -> None:
    run = Run(definition({"id": "a", "input": "${{ abs(input.s) }}"}), {"s": "x"})
    events = run.do(Reprocess("a"))
    assert types(events) == ["StepReprocessRequested", "StepDeadLettered", "ExecutionFailed"]


# ---- replay with reused outputs ------------------------------------------------------------


def test_a_replay_from_a_step_keeps_reused_outputs_and_runs_the_rest() -> None:
    wf = definition(*DIAMOND, output="${{ [steps.a.output, steps.b.output, steps.d.output] }}")
    run = Run(wf, {"v": 2}, eid="ex-2", replay_of="ex-1", reused={"a": "A", "b": "B"})
    assert types(run.last) == ["ExecutionStarted", "StepSucceeded", "StepSucceeded", "StepScheduled"]
    assert run.last[0].replay_of == "ex-1" and run.last[0].reused == {"a": "A", "b": "B"}
    assert [(e.step_id, e.reused_from, e.output) for e in of(run.last, "StepSucceeded")] == [("a", "ex-1", "A"), ("b", "ex-1", "B")]
    assert scheduled(run.last) == [("c", None, 1)]
    assert of(run.last, "StepScheduled")[0].idempotency_key == "ex-2:c"  # a replay gets new keys
    assert run.state.steps["a"].reused_from == "ex-1"
    with pytest.raises(UnknownTask):
        run.do(result("a", "succeeded", eid="ex-2"))  # nothing ran for a reused step
    run.do(result("c", "succeeded", eid="ex-2", output="C"))
    run.do(result("d", "succeeded", eid="ex-2", output="D"))
    assert run.state.status == "completed" and run.state.output == ["A", "B", "D"]


def test_a_replay_that_reuses_every_step_completes_at_once() -> None:
    run = Run(definition(*LINEAR), replay_of="ex-0", reused={"a": 1, "b": 2, "c": 3})
    assert types(run.last)[-1] == "ExecutionCompleted"


# ---- keys, purity, history ------------------------------------------------------------------


def test_idempotency_keys_are_stable_per_step_and_item_across_attempts() -> None:
    run = Run(definition({"id": "a"}, {"id": "m", "needs": ["a"], "map": "${{ steps.a.output }}", "retry": {**NO_JITTER, "max_attempts": 5}}))
    run.ok("a", ["p", "q"])
    for attempt in (1, 2, 3):
        run.fail("m", item=0, attempt=attempt)
    keys: dict[tuple[str, int | None], set[str]] = {}
    for e in of(run.history, "StepScheduled"):
        keys.setdefault((e.step_id, e.item), set()).add(e.idempotency_key)
    assert keys == {("a", None): {f"{EID}:a"}, ("m", 0): {f"{EID}:m#0"}, ("m", 1): {f"{EID}:m#1"}}
    assert [e.attempt for e in of(run.history, "StepScheduled") if e.item == 0] == [1, 2, 3, 4]


def _drive(state: Execution, commands: list[Any]) -> list[Any]:
    out = []
    for c in commands:
        events = decide(state, c, NOW)
        for e in events:
            evolve(state, e)
        out.extend(events)
    return out


@pytest.mark.parametrize(
    "command",
    [
        result("a", "succeeded", output={"go": True, "items": [1, 2]}),
        result("a", "failed", error=StepError(type="E", message="m")),
        result("a", "failed", error=StepError(type="E", message="m", non_retryable=True)),
        Pause(),
        Cancel(),
    ],
)
def test_decide_never_mutates_its_input_state(command: Any) -> None:
    wf = definition(
        {"id": "a", "retry": NO_JITTER},
        {"id": "b", "needs": ["a"], "when": "${{ steps.a.output.go }}"},
        {"id": "m", "needs": ["a"], "map": "${{ steps.a.output.items }}"},
    )
    state = Execution(id=EID)
    _drive(state, [Start(wf, 1, wf.content_hash(), input={"deep": {"x": [1]}})])
    frozen = copy.deepcopy(state)
    version = state.version
    events = decide(state, command, NOW)
    assert events
    assert state == frozen and state.version == version
    again = decide(state, command, NOW)
    assert again == events  # same inputs, same events


def test_fold_of_the_history_equals_the_live_state_and_versions_count_events() -> None:
    run = Run(definition(*MAP), {"q": 1})
    run.ok("a", [1, 2])
    run.fail("m", item=0)
    run.ok("m", item=1)
    run.ok("m", item=0, attempt=2)
    run.ok("z")
    assert run.state.version == len(run.history)
    assert fold(EID, run.history) == run.state
    assert run.state.status == "completed"


def test_events_carry_the_time_they_are_given() -> None:
    later = NOW + timedelta(hours=1)
    run = Run(definition({"id": "a"}))
    assert all(e.at == NOW for e in run.last)
    events = run.do(result("a", "succeeded"), later)
    assert all(e.at == later for e in events)
    assert run.state.finished_at == later and run.state.started_at == NOW


# ---- regressions ----------------------------------------------------------------------------


def test_an_expression_error_stops_scheduling_the_other_ready_steps() -> None:
    # Regression: the scheduling pass went on after the dead letter had failed the execution,
    # scheduling (or dead-lettering again) the next ready step of a finished execution.
    for second in ({"id": "b"}, {"id": "b", "input": "${{ abs(input.s) }}"}):
        run = Run(definition({"id": "a", "input": "${{ abs(input.s) }}"}, second), {"s": "x"})
        assert types(run.last) == ["ExecutionStarted", "StepDeadLettered", "ExecutionFailed"]
        assert run.status("b") == "pending"


def test_a_replay_reusing_a_step_the_definition_does_not_have_is_refused() -> None:
    # Regression: evolve raised KeyError inside decide (a replay onto a version without the step).
    wf = definition({"id": "a"}, {"id": "b", "needs": ["a"]})
    with pytest.raises(DecisionError) as info:
        decide(Execution(id=EID), Start(wf, 2, wf.content_hash(), replay_of="ex-0", reused={"gone": 1}), NOW)
    assert info.value.code == "unknown_step" and "gone" in str(info.value)


def test_a_wrong_content_hash_does_not_run_another_definition() -> None:
    # Regression: definitions were memoised by content hash alone, so a second execution given
    # the same (wrong) hash ran the first one's steps.
    one = definition({"id": "one"})
    two = parse_definition({"name": "other", "steps": [{"id": "two", "type": "noop"}]})
    first = Run(one, start_hash="same")
    second = Run(two, eid="ex-2", start_hash="same")
    assert scheduled(first.last) == [("one", None, 1)]
    assert scheduled(second.last) == [("two", None, 1)]
    assert fold("ex-2", second.history) == second.state


def test_a_map_wider_than_the_element_budget_dead_letters_the_step() -> None:
    run = Run(definition({"id": "a", "map": "${{ input.items }}"}), {"items": [0] * 1_000_001})
    assert types(run.last)[1:] == ["StepDeadLettered", "ExecutionFailed"]
    assert run.last[1].error_type == "ExpressionBudgetError" and "1000000 elements" in run.last[1].error_message
