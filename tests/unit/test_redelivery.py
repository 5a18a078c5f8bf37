"""CrashGuard (services/broker/redelivery.py) and Throttled (services/retrying.py): pure logic."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from services.broker.redelivery import TIMER_ALLOWANCE, CrashGuard
from services.retrying import Throttled


@dataclass
class Msg:  # the fields of a Delivery the guard reads
    delivered: int
    stream_seq: int = 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_poison_after_limit_unexplained_deliveries() -> None:
    guard = CrashGuard(3, careful_for=10, unacked_at_start=0)
    assert [guard.poisoned(Msg(n)) for n in range(1, 6)] == [False, False, False, True, True]
    assert [guard.suspect(Msg(n)) for n in (1, 2)] == [False, True]


def test_deliveries_this_process_lived_through_do_not_count() -> None:
    guard = CrashGuard(3, careful_for=10, unacked_at_start=0)
    msg = Msg(1)
    for n in range(1, 10):  # nine deliveries, each ended by a nak or a failed batch in this process
        msg.delivered = n
        assert not guard.poisoned(msg) and not guard.suspect(msg)
        guard.survived(msg)
    guard.done(msg)
    msg.delivered = 10
    assert guard.poisoned(msg)  # forgotten once acked: a copy seen again counts in full


def test_a_retry_timer_is_allowed_for() -> None:
    guard = CrashGuard(3, careful_for=10, unacked_at_start=0)
    assert not guard.poisoned(Msg(3 + TIMER_ALLOWANCE), TIMER_ALLOWANCE)
    assert guard.poisoned(Msg(4 + TIMER_ALLOWANCE), TIMER_ALLOWANCE)


def test_careful_after_a_suspect_and_at_a_start_after_a_crash() -> None:
    clock = Clock()
    assert not CrashGuard(3, careful_for=10, unacked_at_start=0, clock=clock).careful
    guard = CrashGuard(3, careful_for=10, unacked_at_start=4, clock=clock)
    assert guard.careful
    clock.now += 11
    assert not guard.careful
    guard.suspect(Msg(2))
    assert guard.careful
    assert not CrashGuard(0, careful_for=10, clock=clock).careful  # off


def test_limit_zero_is_off() -> None:
    guard = CrashGuard(0, careful_for=10)
    assert not guard.poisoned(Msg(100)) and not guard.suspect(Msg(100))
    with pytest.raises(ValueError):
        CrashGuard(-1, careful_for=1)


def test_throttled_logs_one_line_per_kind_per_period_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = logging.getLogger("test.throttled")
    throttled = Throttled(log, every=10, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        for i in range(200):  # a failure every 60 ms for 12 s
            try:
                raise ConnectionError(f"away {i}")
            except ConnectionError as exc:
                throttled.failure("publish", "relay: a publish failed", exc=exc)
            throttled.failure("other", "something else")
            clock.now += 0.06
    lines = [r for r in caplog.records if r.name == "test.throttled"]
    publish = [r for r in lines if "publish" in r.getMessage()]
    assert len(publish) == 2 and len(lines) == 4
    assert publish[0].exc_info is not None and publish[1].exc_info is None  # one traceback, then counts
    assert "167 such failures in the last 10s" in publish[1].getMessage() and "away 167" in publish[1].getMessage()


def test_the_setting_stays_below_max_deliver() -> None:
    from services.settings import Settings

    assert Settings.load({}).poison_deliveries == 5
    assert Settings.load({"WEFT_POISON_DELIVERIES": "0"}).poison_deliveries == 0
    with pytest.raises(ValueError, match="WEFT_POISON_DELIVERIES='18'.*max_deliver - 3 = 17"):
        Settings.load({"WEFT_POISON_DELIVERIES": "18"})
    with pytest.raises(ValueError, match="WEFT_POISON_DELIVERIES"):
        Settings.load({"WEFT_POISON_DELIVERIES": "-1"})
