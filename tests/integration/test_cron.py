"""The cron scheduler over a real database: one execution per tick with two schedulers,
and the missed-tick policies after downtime (an injected clock stands in for the downtime)."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import orjson
import pytest

from contracts.definitions import parse_definition
from contracts.triggers import TriggerAccepted, trigger_stream
from services.orchestrator.registry import Registry
from services.store import open_store
from services.triggers.cron import Scheduler
from services.orchestrator.executions import Executions
from services.triggers.ingest import Ingestor, trigger_execution_id
from services.triggers.routing import Catalog
from tests.support import wait_until

pytestmark = pytest.mark.integration
T0 = datetime(2024, 1, 1, 12, 0, 0, 500_000, tzinfo=timezone.utc)


@pytest.fixture
def stores(db_url: str):
    opened: list[Any] = []

    def open_one() -> Any:
        s = open_store(db_url)
        opened.append(s)
        return s

    yield open_one
    for s in opened:
        s.close()


def definition(name: str, cron: str, extra: str = "") -> str:
    return f"""
name: {name}
on:
  - cron: "{cron}"
{extra}
steps: [{{id: a, type: noop}}]
"""


def scheduler(store: Any, clock: Callable[[], datetime] | None = None, ingestor_cls: type = Ingestor) -> Scheduler:
    catalog = Catalog(store)
    kw = {"clock": clock} if clock else {}
    return Scheduler(store, catalog, ingestor_cls(Executions(store), catalog, **kw), grace=60, **kw)


def ticks(store: Any, workflow: str) -> list[str]:
    """The tick (trigger id) of every execution of a workflow, in the order they were stored."""
    out = []
    for rec in store.read(0, 100_000, types=["ExecutionStarted"]):
        e = orjson.loads(rec.data)
        if e["workflow"] == workflow:
            assert e["trigger"]["source"] == f"weft:cron/{workflow}" and e["trigger"]["via"] == "cron"
            out.append(e["trigger"]["id"])
    return out


def at(minutes: int) -> str:
    return (T0.replace(microsecond=0) + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


async def test_two_schedulers_on_a_fast_schedule_start_one_execution_per_tick(stores: Callable[[], Any]) -> None:
    one, two = stores(), stores()
    Registry(one).publish(parse_definition(definition("every-second", "* * * * * *")))
    a, b = scheduler(one), scheduler(two)
    stop = asyncio.Event()
    runs = [asyncio.create_task(s.run(stop)) for s in (a, b)]
    await wait_until(lambda: len(ticks(one, "every-second")) >= 4, timeout=20, what="4 ticks")
    stop.set()
    await asyncio.gather(*runs)
    seen = ticks(one, "every-second")
    assert len(seen) == len(set(seen)), "a tick started twice"
    times = sorted(datetime.fromisoformat(t.replace("Z", "+00:00")) for t in seen)
    assert all((y - x) == timedelta(seconds=1) for x, y in zip(times, times[1:])), "a tick was missed"
    assert a.started + b.started == len(seen)
    for t in seen:  # each tick is in the trigger log, for backfill
        [rec] = one.load(trigger_stream("weft:cron/every-second", t))
        assert TriggerAccepted.model_validate_json(rec.data).via == "cron"


class _Together(Ingestor):
    """Holds each ingest until both schedulers got there: both have planned the same tick."""

    barrier = threading.Barrier(2, timeout=10)

    def ingest(self, triggers: Any) -> Any:
        self.barrier.wait()
        return super().ingest(triggers)


async def test_two_schedulers_racing_for_the_same_tick_start_it_once(stores: Callable[[], Any]) -> None:
    one, two = stores(), stores()
    Registry(one, clock=lambda: T0).publish(parse_definition(definition("race", "*/5 * * * *")))
    now = T0 + timedelta(minutes=5, seconds=1)
    a, b = scheduler(one, lambda: now, _Together), scheduler(two, lambda: now, _Together)
    await asyncio.gather(asyncio.to_thread(a.tick_once), asyncio.to_thread(b.tick_once))
    assert ticks(one, "race") == [at(5)]
    assert (a.started + b.started, a.duplicates + b.duplicates) == (1, 1)
    [(eid, _)] = [(str(r.stream_id), r) for r in one.read(0, 100, types=["ExecutionStarted"])]
    assert eid == trigger_execution_id("race", "weft:cron/race", at(5))


async def test_missed_ticks_are_skipped_by_default(stores: Callable[[], Any]) -> None:
    store = stores()
    Registry(store, clock=lambda: T0).publish(parse_definition(definition("skipper", "*/5 * * * *")))
    now = [T0 + timedelta(minutes=2)]
    s = scheduler(store, lambda: now[0])
    s.tick_once()
    assert ticks(store, "skipper") == []  # nothing due yet
    now[0] = T0 + timedelta(minutes=5, seconds=3)
    s.tick_once()
    assert ticks(store, "skipper") == [at(5)]
    now[0] = T0 + timedelta(minutes=60, seconds=4)  # down for 55 minutes
    s.tick_once()
    assert ticks(store, "skipper") == [at(5), at(60)]  # the on-time tick only
    assert s.skipped == 10  # 12:10 .. 12:55
    # a restarted scheduler knows where it stopped
    again = scheduler(store, lambda: T0 + timedelta(minutes=60, seconds=30))
    again.tick_once()
    assert ticks(store, "skipper") == [at(5), at(60)] and again.started == 0


async def test_catch_up_runs_at_most_n_missed_ticks(stores: Callable[[], Any]) -> None:
    store = stores()
    extra = "    missed: catch_up\n    catch_up_limit: 3"
    Registry(store, clock=lambda: T0).publish(parse_definition(definition("catcher", "*/5 * * * *", extra)))
    now = [T0 + timedelta(minutes=5, seconds=1)]
    s = scheduler(store, lambda: now[0])
    s.tick_once()
    now[0] = T0 + timedelta(minutes=60, seconds=2)
    s.tick_once()
    assert ticks(store, "catcher") == [at(5), at(45), at(50), at(55), at(60)]
    assert s.skipped == 7  # 12:10 .. 12:40


async def test_catch_up_after_the_latest_tick_is_too_late_too(stores: Callable[[], Any]) -> None:
    store = stores()
    extra = "    missed: catch_up\n    catch_up_limit: 2"
    Registry(store, clock=lambda: T0).publish(parse_definition(definition("late", "*/5 * * * *", extra)))
    s = scheduler(store, lambda: T0 + timedelta(minutes=33))  # 12:30 is 3 minutes old: past the grace
    s.tick_once()
    assert ticks(store, "late") == [at(25), at(30)]


async def test_a_schedule_in_a_time_zone(stores: Callable[[], Any]) -> None:
    store = stores()
    extra = '    timezone: "America/New_York"'
    Registry(store, clock=lambda: T0).publish(parse_definition(definition("ny", "0 9 * * *", extra)))
    s = scheduler(store, lambda: datetime(2024, 1, 2, 14, 0, 10, tzinfo=timezone.utc))  # 09:00 in New York
    s.tick_once()
    assert ticks(store, "ny") == ["2024-01-02T14:00:00Z"]
