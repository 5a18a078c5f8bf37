"""Backfill: recorded trigger events of a time range through a workflow version.

The trigger log is written the way ingestion writes it: a `TriggerAccepted`
record at version 1 of `trigger_stream(source, id)`, appended here directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from contracts.definitions import parse_definition
from contracts.triggers import TriggerAccepted, trigger_stream
from services.orchestrator.executions import Executions, execution_id_for
from services.orchestrator.registry import Registry
from services.replay import BackfillError, backfill, operation_history
from services.store import EventStore, NewEvent, open_store
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)

ORDERS = """
name: orders
on:
  - event: order.created
  - event: order.updated
    filter: {data.region: eu}
input_schema: {type: object, required: [order], properties: {order: {type: integer}}}
steps:
  - {id: handle, type: noop}
"""


@pytest.fixture
def store(db_url: str):
    s = open_store(db_url)
    yield s
    s.close()


def _accept(store: EventStore, events: list[dict[str, Any]], received: datetime | None = None) -> None:
    records = []
    for e in events:
        rec = TriggerAccepted(at=received or T0 + timedelta(days=30), event=e, via="topic")
        data = orjson.dumps(rec.model_dump(mode="json"))
        records.append(NewEvent(trigger_stream(e["source"], e["id"]), 1, rec.type, data))
    store.append(records)


def _event(i: int, kind: str = "order.created", *, hours: float = 0, region: str = "eu", timed: bool = True,
           order: Any = None) -> dict[str, Any]:
    e = {"specversion": "1.0", "id": f"evt-{i}", "source": "/shop", "type": kind,
         "data": {"order": i if order is None else order, "region": region}}
    if timed:
        e["time"] = (T0 + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")
    return e


def _history(store: EventStore) -> list[dict[str, Any]]:
    """20 events in range that match, and as many that must not start anything."""
    events = [_event(i, hours=i) for i in range(12)]  # created, in range
    events += [_event(100 + i, "order.updated", hours=i + 0.5, region="eu") for i in range(6)]  # updated, eu
    events += [_event(200 + i, "order.updated", hours=i + 0.5, region="us") for i in range(5)]  # filtered out
    events += [_event(300 + i, "order.shipped", hours=i) for i in range(4)]  # not subscribed
    events += [_event(400 + i, hours=-5 - i) for i in range(3)]  # before the range
    events += [_event(500 + i, hours=48 + i) for i in range(3)]  # after it (end is exclusive)
    events.append(_event(600, hours=48))  # exactly at the end: excluded
    _accept(store, events)
    # without a `time`: the time Weft received them counts
    _accept(store, [_event(700, timed=False), _event(701, timed=False)], received=T0 + timedelta(hours=20))
    _accept(store, [_event(702, timed=False)], received=T0 + timedelta(days=9))
    return events


def _started(store: EventStore) -> Counter[str]:
    """Executions started per trigger event id (from the ExecutionStarted records)."""
    out: Counter[str] = Counter()
    for rec in store.read(0, 100_000, ["ExecutionStarted"]):
        trigger = orjson.loads(rec.data).get("trigger") or {}
        out[trigger.get("id")] += 1
    return out


def test_interrupted_backfill_resumes_and_starts_one_execution_per_event(store: EventStore) -> None:
    v = Registry(store).publish(parse_definition(ORDERS))
    _history(store)
    expected = {f"evt-{i}" for i in [*range(12), *range(100, 106), 700, 701]}
    end = T0 + timedelta(hours=48)
    calls = {"n": 0}

    def stop_after_seven() -> bool:
        calls["n"] += 1
        return calls["n"] > 7

    first = backfill(store, "orders", start=T0, end=end, should_stop=stop_after_seven)
    assert first["cancelled"] and first["started"] == 7 and first["total"] == len(expected)
    assert first["remaining"] == len(expected) - 7
    times = [it["time"] for it in first["items"]]
    assert times == sorted(times)  # oldest first
    second = backfill(store, "orders", start=T0, end=end)
    assert second["id"] == first["id"] and not second["cancelled"]
    assert (second["started"], second["skipped"], second["failed"]) == (len(expected) - 7, 7, 0)
    third = backfill(store, "orders", version=v.version, start=T0, end=end)
    assert (third["started"], third["skipped"]) == (0, len(expected))
    started = _started(store)
    assert set(started) == expected and set(started.values()) == {1}
    ex = Executions(store)
    for item in second["items"]:
        key = f"backfill:{first['id']}:{item['source']}:{item['id']}"
        assert item["execution_id"] == execution_id_for("orders", key)
        state = ex.load(item["execution_id"])
        assert state.trigger["id"] == item["id"] and state.trigger["backfill"] == first["id"]
        assert state.input == {"order": int(item["id"].split("-")[1]), "region": "eu"}
    # each run of the operation is on record
    runs = operation_history(store, first["id"])
    assert [r["type"] for r in runs] == ["OperationStarted", "OperationFinished"] * 3
    assert runs[1]["cancelled"] and runs[3]["counts"]["started"] == len(expected) - 7


def test_a_new_backfill_id_runs_the_events_again_once(store: EventStore) -> None:
    Registry(store).publish(parse_definition(ORDERS))
    _history(store)
    end = T0 + timedelta(hours=48)
    one = backfill(store, "orders", start=T0, end=end)
    two = backfill(store, "orders", start=T0, end=end, backfill_id="fix-2025-03")
    assert one["id"] != two["id"] == "fix-2025-03"
    assert one["started"] == two["started"] == 20
    assert backfill(store, "orders", start=T0, end=end, backfill_id="fix-2025-03")["started"] == 0
    only = backfill(store, "orders", start=T0, end=end, event_type="order.shipped")
    assert only["started"] == 4 and only["event_types"] == ["order.shipped"]
    per_event = _started(store)  # one execution per event per backfill id
    assert Counter(per_event.values()) == {2: 20, 1: 4}


def test_dry_run_rate_limit_and_bad_input(store: EventStore) -> None:
    Registry(store).publish(parse_definition(ORDERS))
    _accept(store, [_event(i, hours=i) for i in range(6)] + [_event(9, hours=1, order="nine")])
    head = store.head()
    dry = backfill(store, "orders", start=T0, end=T0 + timedelta(days=1), dry_run=True)
    assert (dry["would_start"], dry["started"], dry["total"]) == (7, 0, 7)
    assert store.head() == head  # nothing stored, not even an operation record
    began = time.monotonic()
    done = backfill(store, "orders", start=T0, end=T0 + timedelta(days=1), rate=10)
    assert time.monotonic() - began >= 0.55  # 7 starts at 10/s: the last one no sooner than 0.6 s in
    assert (done["started"], done["failed"]) == (6, 1)
    failed = [it for it in done["items"] if it["outcome"] == "failed"]
    assert failed[0]["id"] == "evt-9" and "input.order" in failed[0]["error"]
    for kw, words in (({"workflow": "nope"}, "no workflow named"),
                      ({"version": 7}, "no version 7"),
                      ({"end": T0 - timedelta(days=1)}, "--from must be before --to")):
        args = {"workflow": "orders", "start": T0, "end": T0 + timedelta(days=1), **kw}
        with pytest.raises(BackfillError, match=words):
            backfill(store, args.pop("workflow"), **args)
    Registry(store).publish(parse_definition("name: manual\nsteps: [{id: a, type: noop}]\n"))
    with pytest.raises(BackfillError, match="--event-type"):
        backfill(store, "manual", start=T0, end=T0 + timedelta(days=1))


def _cli(env: dict[str, str], *args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "weft", "backfill", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


async def test_ctrl_c_cancels_cleanly_and_the_same_command_resumes(store: EventStore, tmp_path: Path) -> None:
    Registry(store).publish(parse_definition(ORDERS))
    _history(store)
    env = {**os.environ, "WEFT_HOME": str(tmp_path), "WEFT_DATABASE_URL": store.url, "PYTHONPATH": str(ROOT)}
    args = ("--workflow", "orders", "--from", "2025-03-01T00:00:00Z", "--to", "2025-03-03T00:00:00Z", "--json")
    proc = _cli(env, *args, "--rate", "4/s")
    await wait_until(lambda: sum(_started(store).values()) >= 2, timeout=30, what="the backfill to start some")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1, stderr
    first = orjson.loads(stdout)
    assert first["cancelled"] and 2 <= first["started"] < 20 and first["remaining"] > 0
    proc = _cli(env, *args)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    second = orjson.loads(stdout)
    assert (second["started"], second["skipped"]) == (20 - first["started"], first["started"])
    assert second["id"] == first["id"]
    assert set(_started(store).values()) == {1} and len(_started(store)) == 20
    bad = _cli(env, "--workflow", "orders@x", "--from", "2025-03-01", "--to", "2025-03-02")
    _, err = bad.communicate(timeout=30)
    assert bad.returncode == 2 and "version must be a number" in err
