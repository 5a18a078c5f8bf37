"""contracts.values: what a JSON value from outside may be (issue 13)."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.values import MAX_DEPTH, MAX_INT, MIN_INT, ValueProblem, check_value, loads


def nested(levels: int, inner: Any = 0) -> Any:
    value = inner
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [None, True, 0, MAX_INT, MIN_INT, 1.5, "text", "é ü 中 🎉", {"a": [1, {"b": None}]}, nested(MAX_DEPTH), [], {}],
)
def test_good_values_pass(value: Any) -> None:
    check_value(value, "input")


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ({"a": [1, nested(MAX_DEPTH)]}, "input.a[1]", "nested deeper than 100 levels"),
        ({"a": {"b": MAX_INT + 1}}, "input.a.b", "64-bit range"),
        ([MIN_INT - 1], "input[0]", "64-bit range"),
        ({"a": "ok \ud800"}, "input.a", "lone UTF-16 surrogate"),
        ({"\udfff": 1}, "input[", "key contains a lone UTF-16 surrogate"),
        ({"x y": [float("nan")]}, "input['x y'][0]", "not a finite number"),
        ({"a": float("-inf")}, "input.a", "not a finite number"),
    ],
)
def test_bad_values_name_the_field_and_the_limit(value: Any, path: str, words: str) -> None:
    with pytest.raises(ValueProblem) as info:
        check_value(value, "input")
    assert info.value.path.startswith(path) and words in info.value.message
    str(info.value).encode("utf-8")  # the message itself is always encodable


def test_too_many_elements_and_shared_references_count_each_time() -> None:
    shared = list(range(100))
    with pytest.raises(ValueProblem, match="more than 1000 elements"):
        check_value([shared] * 20, max_elements=1000)
    check_value([shared] * 5, max_elements=1000)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[" * 900 + "]" * 900, "nested deeper than 100 levels"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 100 levels"),  # past the parser's own recursion
        ('{"a": "\\ud800"}', "lone UTF-16 surrogate"),
        ('{"a": 100000000000000000000}', "64-bit range"),
        ('{"a": NaN}', "finite"),
        ('{"a": 1e400}', "finite"),
        ("{", "not JSON"),
        (b"\xff\xfe", "not"),
    ],
)
def test_loads_refuses_what_it_cannot_carry(text: str | bytes, words: str) -> None:
    with pytest.raises(ValueProblem) as info:
        loads(text)
    assert words in info.value.message


def test_a_long_path_is_shortened() -> None:
    with pytest.raises(ValueProblem) as info:
        check_value(nested(150), "body.input")
    assert len(info.value.path) < 200 and info.value.path.startswith("body.input[0]")
