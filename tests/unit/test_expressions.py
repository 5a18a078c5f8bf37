"""The `${{ }}` expression language: JMESPath, rendered into templates, bounded."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from contracts.expressions import (
    MAX_EXPRESSION_CHARS,
    Budget,
    ExpressionBudgetError,
    ExpressionError,
    check_template,
    compile_expression,
    evaluate,
    expressions_in,
    render,
    truthy,
)

CTX: dict[str, Any] = {
    "input": {"a": 1, "s": "text", "l": [1, 2], "d": {"k": "v"}, "n": None, "t": True, "f": 1.5, "e": ""},
    "steps": {"fetch": {"output": {"items": [{"id": 1}, {"id": 2}], "ok": True}, "status": "succeeded"}},
    "item": {"sku": "x-1", "qty": 3},
}


# ---- full string vs interpolation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        # one whole expression: the raw value, whatever its type
        ("${{ input.a }}", 1),
        ("${{ input.l }}", [1, 2]),
        ("${{ input.d }}", {"k": "v"}),
        ("${{ input.n }}", None),
        ("${{ input.t }}", True),
        ("${{ input.missing }}", None),
        ("  ${{ input.l }}\n", [1, 2]),  # surrounding whitespace does not make it text
        ("${{input.a}}", 1),
        ("${{ steps.fetch.output.items[*].id }}", [1, 2]),
        ("${{ item.sku }}", "x-1"),
        ("${{ length(input.l) }}", 2),
        ("${{ `\"}}\"` }}", "}}"),
        # text around expressions: interpolated as text
        ("a=${{ input.a }}", "a=1"),
        ("${{ input.s }}${{ input.s }}", "texttext"),
        ("${{ input.a }} and ${{ input.l }}", "1 and [1,2]"),
        ("x${{ input.n }}y", "xy"),  # null interpolates as nothing
        ("${{ input.d }}!", '{"k":"v"}!'),  # objects as compact JSON
        ("${{ input.t }} ${{ input.f }}", "true 1.5"),
        ("id-${{ item.sku }}", "id-x-1"),  # strings as themselves, no quotes
        ("$${{ input.a }}", "$1"),
        # no expression at all
        ("plain text", "plain text"),
        ("", ""),
        ("${ input.a }", "${ input.a }"),
    ],
)
def test_render_full_string_vs_interpolation(template: str, expected: Any) -> None:
    assert render(template, CTX) == expected


@pytest.mark.parametrize("value", [5, 2.5, True, None, [1, "two"], {"k": 1}])
def test_render_leaves_non_strings_alone(value: Any) -> None:
    assert render(value, CTX) == value


def test_nested_templates_are_walked_recursively() -> None:
    template = {
        "order": "${{ input.a }}",
        "lines": ["${{ input.l }}", {"sku": "${{ item.sku }}", "label": "n=${{ item.qty }}"}, 7, None],
        "deep": {"deeper": {"deepest": ["${{ steps.fetch.output.ok }}"]}},
        "literal": "no expression",
    }
    assert render(template, CTX) == {
        "order": 1,
        "lines": [[1, 2], {"sku": "x-1", "label": "n=3"}, 7, None],
        "deep": {"deeper": {"deepest": [True]}},
        "literal": "no expression",
    }


def test_render_does_not_touch_the_template_or_the_context() -> None:
    template = {"a": ["${{ input.d }}"], "b": "${{ input.l }}"}
    before_t, before_c = copy.deepcopy(template), copy.deepcopy(CTX)
    assert render(template, CTX) == {"a": [{"k": "v"}], "b": [1, 2]}
    assert template == before_t and CTX == before_c


def test_a_rendered_value_is_not_rendered_again() -> None:
    # an input that contains `${{ }}` is data, not a template
    ctx = {"input": {"evil": "${{ input.secret }}", "secret": "s3cret"}}
    assert render("${{ input.evil }}", ctx) == "${{ input.secret }}"
    assert render("x ${{ input.evil }}", ctx) == "x ${{ input.secret }}"


def test_expressions_in_finds_every_expression() -> None:
    template = {"a": ["${{ x }}", "${{ y }} and ${{ z }}"], "b": 1, "c": {"d": "${{ w }}"}}
    assert [e.strip() for e in expressions_in(template)] == ["x", "y", "z", "w"]
    assert expressions_in("no expressions") == [] and expressions_in(None) == []


# ---- errors and bounds -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("${{ input.[ }}", "Incomplete"),
        ("${{ }}", "empty"),
        ("${{    }}", "empty"),
        ("${{ input.a", "unterminated"),
        ("x ${{ input.a }} ${{ input.b", "unterminated"),
        ({"deep": ["${{ input.a"]}, "unterminated"),
        ("${{ " + "a." * MAX_EXPRESSION_CHARS + "a }}", "longer than"),
        ({"k": ["${{ ) }}"]}, ""),
    ],
)
def test_check_template_rejects_bad_templates(template: Any, reason: str) -> None:
    with pytest.raises(ExpressionError) as info:
        check_template(template)
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("template", ["${{ input.a }}", {"a": ["x ${{ input.b }} y"]}, "plain", None, 3, ["${{ item }}"]])
def test_check_template_accepts_good_templates(template: Any) -> None:
    check_template(template)


def test_an_expression_at_the_length_limit_compiles() -> None:
    expr = ".".join(["a"] * (MAX_EXPRESSION_CHARS // 2))
    assert len(expr) <= MAX_EXPRESSION_CHARS
    compile_expression(expr)
    with pytest.raises(ExpressionError, match="longer than"):
        compile_expression(expr + ".bb")


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("${{ abs(input.s) }}", "invalid type"),
        ("${{ unknown_function(input.a) }}", "Unknown function"),
        ("x ${{ abs(input.s) }}", "invalid type"),
        ({"k": ["${{ abs(input.s) }}"]}, "invalid type"),
    ],
)
def test_errors_while_evaluating_are_expression_errors(template: Any, reason: str) -> None:
    with pytest.raises(ExpressionError) as info:
        render(template, CTX)
    assert reason in info.value.reason


SMALL_BYTES = 100_000  # a small byte budget, so that the test does not build 64 MiB strings
BIG = "x" * (SMALL_BYTES // 2 + 10)


@pytest.mark.parametrize(
    ("template", "ok"),
    [
        ("${{ input.big }}", True),  # read, not created: free
        ("${{ [input.big, input.big] }}", False),  # a value built by the expression
        ("${{ join('', [input.big, input.big]) }}", False),
        ("${{ input.big }}${{ input.big }}", False),  # each part fits, the whole does not
        ("${{ input.big }}-", True),
    ],
)
def test_the_size_of_a_result_is_bounded(template: str, ok: bool) -> None:
    ctx = {"input": {"big": BIG}}
    if ok:
        assert len(render(template, ctx, Budget(bytes=SMALL_BYTES))) >= len(BIG)
        return
    with pytest.raises(ExpressionBudgetError, match=f"creates more than {SMALL_BYTES} bytes") as info:
        render(template, ctx, Budget(bytes=SMALL_BYTES))
    assert info.value.limit == "bytes"


def test_evaluate_is_the_raw_jmespath_search() -> None:
    assert evaluate("steps.fetch.output.items[?id > `1`].id", CTX) == [2]
    assert evaluate("input.missing.deeper", CTX) is None


# ---- truthiness ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        (False, False),
        ("", False),
        ([], False),
        ({}, False),
        (True, True),
        (0, True),  # JMESPath: numbers are true, zero included
        (0.0, True),
        ("0", True),
        ("false", True),
        (" ", True),
        ([0], True),
        ([None], True),
        ({"a": None}, True),
    ],
)
def test_truthiness_follows_jmespath(value: Any, expected: bool) -> None:
    assert truthy(value) is expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("input.t", True),
        ("input.e", False),
        ("input.n", False),
        ("input.a > `0`", True),
        ("!input.t", False),
        ("input.missing || input.a", True),
        ("steps.fetch.output.items", True),
        ("steps.fetch.output.items[?id > `5`]", False),
    ],
)
def test_a_when_condition_is_its_truthiness(expression: str, expected: bool) -> None:
    assert truthy(evaluate(expression, CTX)) is expected


# ---- budgets (issue 13): counted as values are created, never built first -------------------

BOMB = "input.v" + " | [@,@]" * 40  # 2^40 elements once serialized


def test_the_doubling_bomb_stops_at_the_element_budget_fast_and_small() -> None:
    import time
    import tracemalloc

    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ExpressionBudgetError) as info:
            render("${{ " + BOMB + " }}", {"input": {"v": "x" * 100}})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1
    assert peak < 5 * 1024 * 1024, peak  # nothing of the 2^40 elements was built
    assert info.value.limit in ("elements", "bytes") and "expression budget" in info.value.reason


@pytest.mark.parametrize(
    ("expression", "budget", "limit"),
    [
        ("input.l[*].[@, @]", Budget(elements=25), "elements"),  # 10 pairs of 2 + the outer list
        ("[input.s, input.s, input.s]", Budget(bytes=300), "bytes"),
        ("join('', [input.s, input.s])", Budget(bytes=300), "bytes"),
        ("to_string(input.l)", Budget(bytes=10), "bytes"),
        ("input.l[*] | [*] | [*] | [*]", Budget(steps=30), "steps"),
        ("input.d" + " | [@]" * 5, Budget(depth=4), "depth"),
        ("sort(input.l)", Budget(elements=5), "elements"),
        ("map(&[@, @], input.l)", Budget(elements=25), "elements"),
    ],
)
def test_each_budget_is_enforced_and_named(expression: str, budget: Budget, limit: str) -> None:
    ctx = {"input": {"l": list(range(10)), "s": "y" * 100, "d": {"k": "v"}}}
    with pytest.raises(ExpressionBudgetError) as info:
        evaluate(expression, ctx, budget)
    assert info.value.limit == limit
    assert getattr(budget, limit) and str(getattr(budget, limit)) in info.value.reason


def test_reading_big_values_costs_nothing_and_one_render_shares_its_budget() -> None:
    ctx = {"input": {"big": list(range(100_000)), "n": 1}}
    assert evaluate("input.big", ctx, Budget(elements=10)) is ctx["input"]["big"]  # read, not created
    budget = Budget(elements=10)
    render({"a": "${{ [input.n, input.n] }}", "b": "${{ [input.n, input.n] }}"}, ctx, budget)
    assert budget.used_elements == 6
    with pytest.raises(ExpressionBudgetError):
        render(["${{ [input.n, input.n, input.n] }}"] * 3, ctx, Budget(elements=10))


def test_a_map_sized_projection_over_10000_items_fits_the_default_budget() -> None:
    items = [{"sku": f"s{i}", "qty": i % 3} for i in range(10_000)]
    out = evaluate("input.items[?qty > `0`].{sku: sku, twice: [qty, qty]}", {"input": {"items": items}})
    assert len(out) == 6_666 and out[0] == {"sku": "s1", "twice": [1, 1]}


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("[" * 400 + "]" * 400, "nested deeper than 32 levels"),
        ("!" * 40 + "a", "nested deeper than 32 levels"),
        ("&" * 40 + "a", ""),  # not JMESPath; the parser says so
        ("a" + "[*]" * 300, "more than 128 operations inside one another"),
        ("a" + " | b" * 200, "more than 128 operations inside one another"),
        ("`" + "[" * 40 + "]" * 40 + "`", "nested deeper than 32 levels"),
        ("`" + "[" * 3000 + "]" * 3000 + "`", "longer than"),
        ("`100000000000000000000000`", "64-bit range"),
    ],
)
def test_deep_expressions_are_refused_when_compiled(expression: str, reason: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(expression)
    assert reason in info.value.reason


def test_the_bomb_compiles_its_budget_is_a_run_time_matter() -> None:
    assert len("${{ " + BOMB + " }}") < 400
    compile_expression(BOMB)
    check_template({"v": "${{ " + BOMB + " }}"})


def test_any_failure_inside_evaluation_is_an_expression_error() -> None:
    a: Any = 1
    b: Any = 1
    for _ in range(5000):  # a step's output is not checked for depth by the gateway
        a, b = [a], [b]
    with pytest.raises(ExpressionBudgetError) as info:  # RecursionError inside == on 5,000 levels
        evaluate("input.a == input.b", {"input": {"a": a, "b": b}})
    assert info.value.limit == "depth"


def test_a_payload_reference_in_a_created_value_costs_its_reference_not_its_payload() -> None:
    from contracts.payloads import guard, make_ref

    ref = make_ref("0" * 64, 60 * 1024 * 1024)  # a 60 MiB payload, stored by reference
    budget = Budget(bytes=10_000)
    out = render("${{ [steps.a.output, steps.a.output] }}", {"steps": {"a": {"output": guard(ref)}}}, budget)
    assert out == [ref, ref] and budget.used_bytes < 1_000
