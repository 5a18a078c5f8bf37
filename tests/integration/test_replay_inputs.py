"""What users type into replay, backfill and `history --at`: parsed, or refused with the field named.

Pure functions, no servers; they sit beside the replay tests they serve.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from services.replay import (
    AtError, BackfillError, ReplayError, parse_at, parse_filter, parse_time, parse_version, parse_workflow,
)
from services.replay.operations import check_id, derive_id
from services.replay.timetravel import attempts, events_upto

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def test_filters() -> None:
    f = parse_filter(" status=failed , workflow=orders,since=24h,limit=10", now=NOW)
    assert (f.workflow, f.status, f.limit, f.version) == ("orders", "failed", 10, None)
    assert f.since == NOW - timedelta(hours=24) and f.until is None
    assert f.text == "limit=10,since=24h,status=failed,workflow=orders"  # order-independent: one operation id
    assert parse_filter("until=2025-01-02T03:04:05Z").until == datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert parse_filter("since=2025-01-02").since == datetime(2025, 1, 2, tzinfo=timezone.utc)
    for bad, words in (("", "empty"), ("colour=red", "unknown key 'colour'"), ("status=done", "status must be"),
                       ("workflow", "key=value"), ("limit=0", "limit must be"), ("version=x", "version must be"),
                       ("since=soon", "not a time"), ("workflow=a,workflow=b", "given twice")):
        with pytest.raises(ReplayError, match=words) as err:
            parse_filter(bad)
        assert err.value.exit_code == 2


def test_versions_and_workflows() -> None:
    assert [parse_version(v) for v in ("same", "LATEST", "3", 2, None)] == ["same", "latest", 3, 2, "same"]
    for bad in ("0", "-1", "newest", 0):
        with pytest.raises(ReplayError, match="same, latest or a number"):
            parse_version(bad)
    assert parse_workflow("orders") == ("orders", None) and parse_workflow("orders@4") == ("orders", 4)
    for bad in ("@3", "orders@", "orders@x", "orders@0"):
        with pytest.raises(BackfillError):
            parse_workflow(bad)


def test_times() -> None:
    assert parse_time("--from", "7d", NOW) == NOW - timedelta(days=7)
    assert parse_time("--from", "90m", NOW) == NOW - timedelta(minutes=90)
    assert parse_time("--from", "2025-05-01T10:00:00+02:00", NOW) == datetime(2025, 5, 1, 8, tzinfo=timezone.utc)
    with pytest.raises(ReplayError, match="--from: not a time"):
        parse_time("--from", "last tuesday", NOW)


def test_at_and_events_upto() -> None:
    assert parse_at("7") == 7 and parse_at(3) == 3
    assert parse_at("2025-06-01T12:00:00Z") == NOW
    assert parse_at("2025-06-01T12:00:00") == NOW  # no zone: UTC
    for bad, code in (("0", 2), ("-2", 2), ("noon", 2)):
        with pytest.raises(AtError) as err:
            parse_at(bad)
        assert err.value.code == code
    history = [SimpleNamespace(at=NOW + timedelta(seconds=i), type="x") for i in range(5)]
    assert events_upto(history, 3) == 3 and events_upto(history, 5) == 5
    with pytest.raises(AtError, match="has 5 event"):
        events_upto(history, 99)  # beyond the end: said so, not quietly the last event
    assert events_upto(history, NOW + timedelta(seconds=2.5)) == 3  # the last event at or before the time
    assert events_upto(history, NOW + timedelta(seconds=2)) == 3
    with pytest.raises(AtError, match="did not exist yet") as err:
        events_upto(history, NOW - timedelta(seconds=1))
    assert err.value.code == 1


def test_attempts_as_of() -> None:
    def e(kind: str, **kw: object) -> SimpleNamespace:
        return SimpleNamespace(type=kind, at=NOW, item=None, **kw)

    history = [
        e("StepScheduled", step_id="a", attempt=1),
        e("StepFailed", step_id="a", attempt=1, worker_id="w1", error_type="Boom", error_message="no"),
        e("StepScheduled", step_id="a", attempt=2),
        e("StepSucceeded", step_id="a", attempt=2, worker_id="w2"),
        e("StepSucceeded", step_id="b", attempt=0, worker_id=None),  # reused / gathered: not an attempt
    ]
    got = [(a["step_id"], a["attempt"], a["status"], a["worker_id"]) for a in attempts(history)]
    assert got == [("a", 1, "failed", "w1"), ("a", 2, "succeeded", "w2")]
    assert attempts(history[:3])[1]["status"] == "scheduled"


def test_operation_ids() -> None:
    one = derive_id("replay", {"filter": "status=failed", "version": "same"})
    assert one == derive_id("replay", {"version": "same", "filter": "status=failed"})
    assert one != derive_id("replay", {"filter": "status=failed", "version": 2})
    assert one.startswith("replay-") and len(one) == len("replay-") + 16
    assert check_id("--id", "fix-2025-03:eu") == "fix-2025-03:eu"
    for bad in ("", "has space", "-leading", "x" * 200):
        with pytest.raises(ValueError, match="--id"):
            check_id("--id", bad)
