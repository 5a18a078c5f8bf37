"""The payload policy (contracts/payloads.py), the claim check on a real SQLite store
(services/payloads.py), and how the pure core treats references."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest

from contracts import events as ev
from contracts.expressions import ExpressionError, render
from contracts.payloads import (
    KIB,
    MIB,
    REF_KEY,
    Guarded,
    NotJson,
    PayloadLimits,
    PayloadTooLarge,
    ReservedKey,
    guard,
    is_ref,
    make_ref,
    measure,
    refs_in,
    replace_refs,
)
from services.payloads import Claims
from services.store import open_store
from tests.unit.test_decide import Run, definition, scheduled, types

SHA = "a" * 64


def test_limits_must_leave_the_broker_room_and_be_ordered() -> None:
    assert PayloadLimits().inline == 256 * KIB and PayloadLimits().maximum == 64 * MIB
    with pytest.raises(ValueError, match="headers and envelope"):
        PayloadLimits(inline=900 * KIB)
    with pytest.raises(ValueError, match="under the inline limit"):
        PayloadLimits(inline=256 * KIB, maximum=100 * KIB)


def test_measure_refuses_over_the_maximum_naming_limit_and_size() -> None:
    limits = PayloadLimits(inline=4 * KIB, maximum=64 * KIB)
    value = {"s": "x" * (64 * KIB)}
    with pytest.raises(PayloadTooLarge) as caught:
        measure(value, limits, "the execution input")
    size = len(orjson.dumps(value))
    assert caught.value.size == size and caught.value.limit == 64 * KIB
    assert str(size) in str(caught.value) and str(64 * KIB) in str(caught.value) and "WEFT_PAYLOAD_MAX" in str(caught.value)
    assert measure({"s": "ok"}, limits, "x") == b'{"s":"ok"}'


@pytest.mark.parametrize("value", [{REF_KEY: SHA}, [1, {"a": {REF_KEY: "x"}}], {"k": f"{REF_KEY}"}])
def test_the_reference_key_is_reserved_at_entrances(value: Any) -> None:
    if value == {"k": REF_KEY}:  # as a string value it is harmless
        measure(value, PayloadLimits(), "input")
        return
    with pytest.raises(ReservedKey):
        measure(value, PayloadLimits(), "input")


@pytest.mark.parametrize("value", ["\ud800", 2**70, float("nan")])
def test_what_cannot_be_json_is_a_clear_error(value: Any) -> None:
    if isinstance(value, float):  # orjson writes NaN as null: accepted, like the HTTP parser would
        measure(value, PayloadLimits(), "input")
        return
    with pytest.raises(NotJson, match="input cannot be encoded as JSON"):
        measure({"v": value}, PayloadLimits(), "input")


def test_refs_are_found_and_replaced_anywhere() -> None:
    ref = make_ref(SHA, 10)
    value = {"a": [1, ref, {"b": ref}], "c": "d"}
    assert refs_in(value) == [SHA, SHA] and is_ref(ref) and not is_ref({"a": 1})
    assert replace_refs(value, lambda d: {"resolved": d}) == {"a": [1, {"resolved": SHA}, {"b": {"resolved": SHA}}],
                                                               "c": "d"}


def test_an_expression_passes_a_reference_on_whole_but_cannot_look_inside() -> None:
    ref = make_ref(SHA, 3 * MIB)
    ctx = {"steps": {"a": {"output": guard(ref)}}}
    passed = render({"data": "${{ steps.a.output }}"}, ctx)
    assert passed == {"data": ref} and orjson.loads(orjson.dumps(passed)) == {"data": ref}
    for expr in ("steps.a.output.items", "steps.a.output.*", "steps.a.output.size"):
        with pytest.raises(ExpressionError, match="stored by reference"):
            render("${{ " + expr + " }}", ctx)
    for expr in ("keys(steps.a.output)", "values(steps.a.output)"):  # JMESPath's own type check says no
        with pytest.raises(ExpressionError, match="invalid type"):
            render("${{ " + expr + " }}", ctx)
    assert isinstance(guard([ref, 1])[0], Guarded) and guard({"plain": 1}) == {"plain": 1}
    assert ev.StepScheduled.model_validate_json(ev.encode(ev.StepScheduled(
        at="2024-01-01T00:00:00Z", step_id="s", attempt=1, step_type="noop", idempotency_key="k",
        input={"d": Guarded(ref)}))).input == {"d": ref}


def test_the_core_fails_a_step_whose_expression_looks_inside_a_reference() -> None:
    wf = definition({"id": "a"}, {"id": "b", "needs": ["a"], "input": {"x": "${{ steps.a.output.items }}"}},
                    {"id": "c", "needs": ["a"], "input": "${{ steps.a.output }}"})
    run = Run(wf, {})
    ref = make_ref(SHA, 2 * MIB)
    run.ok("a", ref)
    assert "StepDeadLettered" in types(run.last) and run.state.status == "failed"
    [dead] = [e for e in run.last if e.type == "StepDeadLettered"]
    assert dead.step_id == "b" and dead.error_type == "ExpressionError" and "stored by reference" in dead.error_message


def test_the_core_passes_a_referenced_output_on_whole_and_maps_refuse_it_clearly() -> None:
    wf = definition({"id": "a"}, {"id": "b", "needs": ["a"], "input": {"data": "${{ steps.a.output }}"}})
    run = Run(wf, {})
    ref = make_ref(SHA, 2 * MIB)
    run.ok("a", ref)
    assert scheduled(run.last) == [("b", None, 1)]
    assert [e.input for e in run.last if e.type == "StepScheduled"] == [{"data": ref}]
    mapped = definition({"id": "a"}, {"id": "m", "needs": ["a"], "map": "${{ steps.a.output }}"})
    run = Run(mapped, {})
    run.ok("a", ref)
    [dead] = [e for e in run.last if e.type == "StepDeadLettered"]
    assert "map needs a list, got a value stored by reference" in dead.error_message


@pytest.fixture
def claims(tmp_path: Any) -> Any:
    store = open_store(f"sqlite:///{tmp_path / 'w.db'}")
    yield Claims.on(store, PayloadLimits(inline=4 * KIB, maximum=1 * MIB))
    store.close()


def test_claims_store_big_values_once_and_resolve_them(claims: Claims) -> None:
    small = {"s": "x"}
    assert claims.store(small) is small
    big = {"s": "y" * (8 * KIB)}
    ref = claims.store(big)
    data = orjson.dumps(big)
    assert ref == make_ref(hashlib.sha256(data).hexdigest(), len(data)) and claims.store(big) == ref
    assert claims.resolve({"a": [ref, 1]}) == {"a": [big, 1]}
    assert claims.same(ref, big) and not claims.same(ref, {"s": "z"}) and claims.same(small, {"s": "x"})
    with pytest.raises(PayloadTooLarge):
        claims.store_output({"s": "z" * MIB})


def test_claims_offload_only_events_over_the_inline_limit(claims: Claims) -> None:
    at = "2024-01-01T00:00:00Z"
    small = ev.StepSucceeded(at=at, step_id="a", attempt=1, output={"n": 1})
    big = ev.StepSucceeded(at=at, step_id="a", attempt=1, output={"s": "q" * (8 * KIB)})
    other = ev.StepFailed(at=at, step_id="a", attempt=1, error_type="E", error_message="m" * (8 * KIB))
    out, moved = claims.offload([small])
    assert not moved and out == [(small, ev.encode(small))]
    out, moved = claims.offload([small, big, other])
    assert moved and out[0][0] is small and out[2][0] is other  # only payload fields move
    stored = out[1][0]
    assert is_ref(stored.output) and len(out[1][1]) < 4 * KIB
    assert claims.resolve(stored.output) == big.output
