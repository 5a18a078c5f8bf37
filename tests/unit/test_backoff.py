"""Retry backoff: a pure function of the policy, the number of failures and a seed."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.definitions import RetryPolicy
from services.orchestrator.backoff import backoff, unit_jitter


def policy(**kw: float | bool) -> RetryPolicy:
    base: dict[str, float | bool] = {"initial_delay": 1, "max_delay": 60, "multiplier": 2, "jitter": False}
    return RetryPolicy(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "failures", "expected"),
    [
        ({}, 1, 1.0),
        ({}, 2, 2.0),
        ({}, 3, 4.0),
        ({}, 6, 32.0),
        ({}, 7, 60.0),  # 64 capped at max_delay
        ({}, 50, 60.0),
        ({"initial_delay": 0.2, "multiplier": 3}, 3, 0.2 * 9),
        ({"multiplier": 1}, 10, 1.0),  # constant backoff
        ({"initial_delay": 0}, 5, 0.0),  # no wait at all
        ({"initial_delay": 5, "max_delay": 2}, 1, 2.0),  # the cap wins even on the first retry
        ({"max_delay": 0}, 3, 0.0),
        ({}, 0, 1.0),  # defensive: "zero failures" is treated as the first
    ],
)
def test_exponential_and_capped(kw: dict[str, float], failures: int, expected: float) -> None:
    assert backoff(policy(**kw), failures, "seed") == pytest.approx(expected)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(5.0, 5.0), (0.0, 0.0), (59.9, 59.9), (61.0, 60.0), (1e12, 60.0), (-3.0, 0.0)],
)
@pytest.mark.parametrize("jitter", [False, True])
def test_a_requested_delay_wins_but_is_capped(requested: float, expected: float, jitter: bool) -> None:
    assert backoff(policy(jitter=jitter), 3, "seed", requested) == expected


@pytest.mark.parametrize("failures", [1, 2, 3, 5, 8, 20])
@pytest.mark.parametrize("seed", ["ex:a", "ex:a#0", "ex:a#1", "other:b", ""])
def test_jitter_is_within_half_to_full_delay(failures: int, seed: str) -> None:
    plain = backoff(policy(), failures, seed)
    jittered = backoff(policy(jitter=True), failures, seed)
    assert plain / 2 <= jittered < plain


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    initial=st.floats(0.001, 86_400),
    cap=st.floats(0.001, 86_400),
    multiplier=st.floats(1, 100),
    failures=st.integers(1, 10**6),
    seed=st.text(max_size=40),
)
def test_jitter_bounds_for_any_policy(initial: float, cap: float, multiplier: float, failures: int, seed: str) -> None:
    plain = backoff(policy(initial_delay=initial, max_delay=cap, multiplier=multiplier), failures, seed)
    jittered = backoff(policy(initial_delay=initial, max_delay=cap, multiplier=multiplier, jitter=True), failures, seed)
    assert 0 < plain <= cap
    assert plain / 2 <= jittered < plain or jittered == plain == 0


def test_jitter_is_deterministic_for_a_seed_and_spread_across_seeds() -> None:
    p = policy(jitter=True, initial_delay=10, max_delay=10)
    assert backoff(p, 2, "ex-1:step") == backoff(p, 2, "ex-1:step")
    spread = {backoff(p, 2, f"ex-{i}:step") for i in range(200)}
    assert len(spread) == 200  # no two tasks wake up at the same instant
    assert min(spread) < 6 and max(spread) > 9  # and they use the whole window [5, 10)
    # the same task gets a different jitter on its next attempt
    assert backoff(p, 2, "ex-1:step") != backoff(p, 3, "ex-1:step")


def test_unit_jitter_is_stable_and_in_the_unit_interval() -> None:
    values = [unit_jitter(f"seed-{i}") for i in range(2000)]
    assert all(0 <= v < 1 for v in values)
    assert unit_jitter("seed-1") == values[1]
    assert 0.4 < sum(values) / len(values) < 0.6


@pytest.mark.parametrize("failures", [64, 65, 1_000, 10**6, 10**18, 10**100])
@pytest.mark.parametrize("jitter", [False, True])
def test_huge_attempt_counts_do_not_overflow(failures: int, jitter: bool) -> None:
    p = policy(initial_delay=86_400, multiplier=100, max_delay=86_400, jitter=jitter)
    delay = backoff(p, failures, "seed")
    assert math.isfinite(delay) and 86_400 / 2 <= delay <= 86_400
