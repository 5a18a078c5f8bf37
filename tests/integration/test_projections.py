"""The status views against the histories they are built from, on SQLite and PostgreSQL.

Histories are real: executions driven through the pure core and the store by
tests/golden/drive.py (every kind: map, skip, retries, dead letter, reprocess,
retry, cancel, pause, replay with reused outputs).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from services.orchestrator.executions import Executions
from services.orchestrator.state import fold
from services.projections import (
    ExecutionsView, Projector, default_views, get_execution, list_executions, projection_status, rebuild,
    step_runs, timeline, workflow_stats,
)
from services.projections.runner import META
from services.store import EventStore, open_store
from tests.golden.drive import MIX_WORKFLOWS, Clock, Driver, flaky, seed_mix

pytestmark = pytest.mark.integration


@pytest.fixture
def store(db_url: str):
    s = open_store(db_url)
    yield s
    s.close()


def _histories(store: EventStore, ids: list[str]) -> dict[str, list[Any]]:
    ex = Executions(store)
    return {eid: ex.history(eid) for eid in ids}


def _all_ids(kinds: dict[str, list[str]]) -> list[str]:
    return list(dict.fromkeys(i for ids in kinds.values() for i in ids))


def test_views_show_what_the_histories_say(store: EventStore) -> None:
    ex = Executions(store, clock=Clock(tick=0.013))
    kinds = seed_mix(ex, 27)
    ids = _all_ids(kinds)
    histories = _histories(store, ids)
    projector = Projector(store, default_views(), batch=97)  # many batches, events of one execution split
    assert projector.catch_up() > 0
    with store.transaction() as tx:
        for eid, history in histories.items():
            state = fold(eid, history)
            row = get_execution(tx, eid)
            assert row is not None
            assert (row["status"], row["workflow"], row["version"]) == (state.status, state.workflow,
                                                                        state.workflow_version)
            assert row["output"] == state.output and row["input"] == state.input
            assert row["replay_of"] == state.replay_of and row["events"] == len(history)
            assert row["steps"] == {sid: s.status for sid, s in state.steps.items()}
            running = sorted(sid for sid, s in state.steps.items() if s.status == "scheduled")
            assert sorted(row["current_steps"]) == ([] if state.finished else running)
            if state.finished:
                assert row["finished_at"] is not None
                expected_ms = (state.finished_at - state.started_at).total_seconds() * 1000
                assert row["duration_ms"] == pytest.approx(expected_ms)
            if state.status == "failed":
                assert (row["error_type"], row["error_step"]) == (state.error[1], state.error[0])

            # the timeline: one row per event, in order
            rows = timeline(tx, eid)
            assert [r["seq"] for r in rows] == list(range(1, len(history) + 1))
            assert [r["type"] for r in rows] == [e.type for e in history]

            # step runs: one row per attempt, with the outcome the events recorded
            expected: dict[tuple[str, Any, int], str] = {}
            for e in history:
                key = (getattr(e, "step_id", None), getattr(e, "item", None), getattr(e, "attempt", None))
                if e.type == "StepScheduled":
                    expected[key] = "scheduled"
                elif e.type in ("StepSucceeded", "StepFailed") and e.attempt > 0:
                    expected[key] = "succeeded" if e.type == "StepSucceeded" else "failed"
                elif e.type == "StepSucceeded" and e.reused_from:
                    expected[key] = "reused"
                elif e.type == "StepDeadLettered":
                    expected[key] = "dead_lettered"
                elif e.type == "StepResultIgnored" and expected.get(key) == "scheduled":
                    expected[key] = "ignored"
            got = {(r["step_id"], r["item"], r["attempt"]): r["status"] for r in step_runs(tx, eid)}
            assert got == expected, eid
        # lineage: a replay's source lists it
        for eid in kinds["replayed"]:
            source = fold(eid, histories[eid]).replay_of
            assert get_execution(tx, source)["replays"] == [eid]
        # per-workflow stats
        states = [fold(eid, h) for eid, h in histories.items()]
        stats = {r["workflow"]: r for r in workflow_stats(tx)}
        for wf in ("shapes", "linear"):
            mine = [s for s in states if s.workflow == wf]
            counts = Counter(s.status for s in mine)
            row = stats[wf]
            assert row["total"] == len(mine)
            assert {k: row[k] for k in ("running", "paused", "completed", "failed", "cancelled")} == \
                {k: counts.get(k, 0) for k in ("running", "paused", "completed", "failed", "cancelled")}
            durations = sorted((s.finished_at - s.started_at).total_seconds() * 1000 for s in mine
                               if s.status == "completed")
            for name, p in (("p50_ms", 0.5), ("p95_ms", 0.95)):
                assert row[name] == pytest.approx(durations[math.ceil(p * len(durations)) - 1])
            done = counts["completed"] + counts["failed"]
            assert row["failure_rate"] == pytest.approx(round(counts["failed"] / done, 4))
        listed = list_executions(tx, workflow="shapes", status="failed")
        assert {r["id"] for r in listed} == {s.id for s in states if s.workflow == "shapes" and s.status == "failed"}
    status = {r["id"]: r for r in projection_status(store, default_views())}
    assert all(r["lag"] == 0 and r["position"] == store.head() for r in status.values())


def _tables(store: EventStore, views: list[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of these views, in key order, keyed by logical table name."""
    out = {}
    with store.transaction() as tx:
        for view in views:
            for logical, spec in view.tables.items():
                tx.execute(f"SELECT * FROM {view.t[logical]} ORDER BY {', '.join(spec.key)}")
                out[logical] = tx.fetchall()
    return out


def test_rebuild_gives_the_live_rows_under_concurrent_appends(store: EventStore) -> None:
    ex = Executions(store, clock=Clock(tick=0.007))
    seed_mix(ex, 18)  # some history before the live views start
    live, twin = default_views(), default_views("cmp_")
    stop = threading.Event()
    errors: list[BaseException] = []
    appended = {"rounds": 0}

    def appender() -> None:  # new executions and results keep arriving throughout
        try:
            from contracts.definitions import parse_definition
            from services.orchestrator.registry import Registry

            version = Registry(store).publish(parse_definition(MIX_WORKFLOWS["shapes"]))
            driver, flying = Driver(ex), []
            while not stop.is_set():
                flying += [ex.start(version, {"n": 1, "items": [1, 2], "flag": True})[0].id for _ in range(3)]
                flying = driver.round(flying, flaky(5))
                appended["rounds"] += 1
                time.sleep(0.01)  # a steady stream, not a flood the rebuild can never catch
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def follower(projector: Projector) -> None:
        try:
            while not stop.is_set():
                if projector.catch_up_once() == 0:
                    time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=appender),
               threading.Thread(target=follower, args=(Projector(store, live, batch=50),)),
               threading.Thread(target=follower, args=(Projector(store, twin, batch=333),))]
    for t in threads:
        t.start()
    try:
        seen: list[int] = []

        def progress(done: int, total: int) -> None:
            # reads of the live view keep working while the shadow fills
            with store.transaction() as tx:
                seen.append(len(list_executions(tx, limit=100_000)))
            if done >= total:  # the shadow caught up: an append right now lands between it and the swap
                ex.start(_version(store), {"n": 2, "items": [], "flag": False})

        deadline = time.monotonic() + 10
        while appended["rounds"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        results = [rebuild(store, view, batch=120, progress=progress) for view in live]
        assert all(r.generation == 1 for r in results)
        # the append in progress() is an ExecutionStarted: the views that follow it had to catch it up
        raced = [r for r, view in zip(results, live) if "ExecutionStarted" in view.types]
        assert raced and all(r.during_swap > 0 for r in raced), "the swaps had nothing to catch up: no race tested"
        assert seen and seen == sorted(seen) and seen[0] > 0
        time.sleep(0.2)  # appends carry on after the swaps too
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert appended["rounds"] >= 5
    for views in (live, twin):
        Projector(store, views).catch_up()
    rebuilt, followed = _tables(store, live), _tables(store, twin)
    assert rebuilt.keys() == followed.keys()
    for logical in rebuilt:
        assert len(rebuilt[logical]) > 0
        assert rebuilt[logical] == followed[logical], f"{logical}: rebuilt rows differ from the live-followed ones"
    with store.transaction() as tx:  # exactly one timeline row per execution event
        tx.execute("SELECT COUNT(*) FROM weft_timeline")
        rows = tx.fetchone()[0]
    events = sum(len(r) for r in store.load_many([uuid.UUID(x[0]) for x in rebuilt["executions"]]).values())
    assert rows == events


def test_an_outdated_view_is_rebuilt_before_it_is_followed(store: EventStore) -> None:
    ex = Executions(store)
    kinds = seed_mix(ex, 9)
    Projector(store, default_views()).catch_up()
    victim = kinds["completed"][0]
    with store.transaction() as tx:  # as if an older version of the code had built the rows
        tx.execute(f"UPDATE {META} SET version = 1 WHERE name = 'view:executions'")
        tx.execute("UPDATE weft_executions SET status = 'bogus' WHERE id = ?", (victim,))
    projector = Projector(store, default_views())
    assert [v.name for v in projector.outdated] == ["view:executions"]
    status = {r["id"]: r for r in projection_status(store, default_views())}
    assert status["view:executions"]["needs_rebuild"] is True
    projector.catch_up()
    with store.transaction() as tx:
        assert get_execution(tx, victim)["status"] == "completed"
    status = {r["id"]: r for r in projection_status(store, default_views())}
    assert status["view:executions"]["generation"] == 1 and not status["view:executions"]["needs_rebuild"]
    assert status["view:executions"]["lag"] == 0


def test_lag_and_rate_are_reported(store: EventStore) -> None:
    ex = Executions(store)
    seed_mix(ex, 9)
    projector = Projector(store, default_views(), batch=50)
    before = {r["id"]: r for r in projection_status(store, default_views())}
    assert all(r["lag"] == store.head() and r["position"] == 0 for r in before.values())
    projector.catch_up_once()
    mid = {r["id"]: r for r in projection_status(store, default_views())}
    assert all(0 < r["lag"] < store.head() for r in mid.values())
    assert all(r["events_per_s"] > 0 for r in mid.values())
    projector.catch_up()
    after = projection_status(store, default_views())
    assert all(r["lag"] == 0 for r in after)
    # events that are not execution events (a workflow publish) do not leave a lag behind
    from contracts.definitions import parse_definition
    from services.orchestrator.registry import Registry

    Registry(store).publish(parse_definition("name: another\nsteps: [{id: a, type: noop}]\n"))
    projector.catch_up()
    assert all(r["lag"] == 0 for r in projection_status(store, default_views()))


def test_a_second_rebuild_of_the_same_view_is_refused_while_one_runs(store: EventStore) -> None:
    from services.projections import RebuildBusy

    ex = Executions(store)
    seed_mix(ex, 9)
    view = ExecutionsView()
    inner: list[BaseException] = []

    def progress(done: int, total: int) -> None:
        if not inner:
            try:
                rebuild(store, ExecutionsView(), batch=10)
            except BaseException as exc:  # noqa: BLE001
                inner.append(exc)

    result = rebuild(store, view, batch=10, progress=progress)
    assert len(inner) == 1 and isinstance(inner[0], RebuildBusy)
    assert result.generation == 1
    # the refused one left nothing behind: a later rebuild works
    assert rebuild(store, view).generation == 2


def test_driver_histories_are_consistent_across_batch_sizes(store: EventStore) -> None:
    """The same events give the same rows whatever the batch boundaries."""
    ex = Executions(store, clock=Clock())
    ids = [ex.start(_version(store), {"n": i, "items": [1, 2, 3], "flag": i % 2 == 0})[0].id for i in range(6)]
    Driver(ex).run(ids, flaky(2))
    one, many = default_views(), default_views("b1_")
    Projector(store, one, batch=10_000).catch_up()
    Projector(store, many, batch=1).catch_up()
    assert _tables(store, one) == _tables(store, many)


def _version(store: EventStore):
    from contracts.definitions import parse_definition
    from services.orchestrator.registry import Registry

    return Registry(store).publish(parse_definition(MIX_WORKFLOWS["shapes"]))


async def test_a_woken_projector_looks_at_the_log_before_its_next_poll(store: EventStore) -> None:
    """The dead-letter service wakes the projector of its process when it has stored dead letters
    (rather than run a second projector over the same log): the rows appear at once, not a poll later."""
    ex = Executions(store)
    projector = Projector(store, default_views(), poll_interval=30.0)
    stop = asyncio.Event()
    running = asyncio.create_task(projector.run(stop))
    try:
        await asyncio.sleep(0.5)  # caught up with nothing, now asleep for 30 s
        seed_mix(ex, 3)
        head = store.head()

        def position() -> int:
            return min(int(r["position"]) for r in projection_status(store, default_views()))

        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(position) < head  # still asleep: nothing looked
        t0 = time.perf_counter()
        projector.wake()
        while await asyncio.to_thread(position) < head:
            assert time.perf_counter() - t0 < 10, "the woken projector did not catch up"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await running


async def test_a_failing_projector_waits_as_long_as_it_says_doubling_and_a_wake_does_not_cut_it_short(
    store: EventStore, caplog: pytest.LogCaptureFixture,
) -> None:
    projector = Projector(store, default_views(), poll_interval=0.1)
    stop, calls, loop = asyncio.Event(), [], asyncio.get_running_loop()

    def failing() -> int:
        calls.append(time.monotonic())
        if len(calls) <= 3:
            loop.call_soon_threadsafe(projector.wake)  # new events told meanwhile: the store is still away
            raise RuntimeError("the store is away")
        stop.set()
        return 0

    projector.catch_up_once = failing  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(projector._follow(stop), timeout=10)
    finally:
        projector.close()
    # One line for the run of failures (services/retrying.py: a line per outage, not per round),
    # then the waits themselves double: 0.1, 0.2, 0.4.
    logged = [r.getMessage().rpartition("retrying in ")[2] for r in caplog.records if "projector failed" in r.getMessage()]
    assert logged == ["0.1s"]
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(gaps) == 3 and all(gap >= want for want, gap in zip((0.1, 0.2, 0.4), gaps)), gaps
    assert sum(gaps) < 1.1, gaps  # 0.7 as logged; sleeping the doubled delays would take 1.4
