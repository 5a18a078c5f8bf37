"""The cron scheduler: `on: [{cron: "*/5 * * * *", timezone: Europe/Paris}]`.

Exactly one execution per tick, however many schedulers run: a tick is a
CloudEvent with source `weft:cron/<workflow>` and id = the tick's time (UTC,
ISO 8601), ingested like any trigger, so its execution id is a function of
(workflow, tick) and a second scheduler's attempt collides in the store and
counts as a duplicate. The tick is recorded in the trigger log like any other
event, so backfill sees it.

Which ticks run (`missed: skip | catch_up`, `catch_up_limit: N`):
  - A tick is *due* when its time has come and no scheduler has handled it
    (each schedule's last handled tick is a tracking record in the store, so a
    restarted scheduler knows where it stopped; a schedule never handled starts
    from the time its workflow version was published).
  - The most recent due tick is *on time* if it is at most `grace` seconds old:
    it runs, late but once. Every other due tick was *missed* (downtime).
  - `skip` (the default): missed ticks do not run.
    `catch_up`: the most recent `catch_up_limit` missed ticks run, oldest first;
    older ones are skipped.
Cron expressions have 5 fields, or 6 with seconds last (`* * * * * */10`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from contracts.triggers import CloudEvent
from services.broker import Transport
from services.orchestrator.executions import utcnow
from services.retrying import Backoff, sleep_or_stop
from services.store import ConcurrencyError, EventStore
from services.triggers.ingest import Ingestor, Outcome, Trigger
from services.triggers.publish import dead_letter_rejected, encode
from services.triggers.routing import Catalog, Route

log = logging.getLogger("weft.cron")
CRON_EVENT_TYPE = "weft.cron.tick"
_EPSILON = timedelta(microseconds=1)
_COUNT_CAP = 1000


@dataclass(frozen=True, slots=True)
class TickPlan:
    run: list[datetime]  # ticks to start, oldest first (UTC)
    latest: datetime | None  # the most recent due tick: handled after this plan
    skipped: int  # missed ticks that do not run (counted up to 1000)


def plan_ticks(
    expr: str, tz: str, last: datetime, now: datetime, *, missed: str = "skip", limit: int = 1, grace: float = 60.0,
) -> TickPlan:
    """Which ticks in (last, now] to run. Pure: the clock comes in as `now`."""
    zone = ZoneInfo(tz)
    keep = 1 + (limit if missed == "catch_up" else 0)
    it = croniter(expr, (now + _EPSILON).astimezone(zone))  # get_prev excludes its start: now itself counts
    due: list[datetime] = []
    more = 0  # older due ticks, counted up to a cap (only the log needs the number)
    while True:
        tick = it.get_prev(datetime).astimezone(timezone.utc)
        if tick <= last:
            break
        if len(due) < keep:
            due.append(tick)
        else:
            more += 1
            if more >= _COUNT_CAP:
                break
    if not due:
        return TickPlan([], None, 0)
    due.reverse()
    latest = due[-1]
    on_time = (now - latest).total_seconds() <= grace
    missed_ticks = due[:-1] if on_time else due
    caught = missed_ticks[-limit:] if missed == "catch_up" and limit > 0 else []
    run = caught + ([latest] if on_time else [])
    return TickPlan(run, latest, len(missed_ticks) - len(caught) + more)


def tick_event(workflow: str, spec_cron: str, tz: str, tick: datetime) -> CloudEvent:
    at = tick.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return CloudEvent(
        id=at, source=f"weft:cron/{workflow}", type=CRON_EVENT_TYPE, subject=spec_cron, time=tick,
        data={"scheduled_at": at, "cron": spec_cron, "timezone": tz},
    )


def tracking_name(workflow: str, cron: str, tz: str) -> str:
    digest = hashlib.sha256(f"{cron}\x00{tz}".encode()).hexdigest()[:12]
    return f"cron:{workflow}:{digest}"


class Scheduler:
    """Starts the executions of cron ticks. Any number may run against one store."""

    def __init__(
        self, store: EventStore, catalog: Catalog, ingestor: Ingestor, *, transport: Transport | None = None,
        clock: Callable[[], datetime] = utcnow, grace: float = 60.0, max_sleep: float = 1.0,
    ):
        self.store, self.catalog, self.ingestor, self.transport = store, catalog, ingestor, transport
        self.clock, self.grace, self.max_sleep = clock, grace, max_sleep
        self.started = self.duplicates = self.skipped = 0
        self._broken: set[tuple[str, int, str]] = set()  # (workflow, version, cron) already logged as invalid

    def tick_once(self, now: datetime | None = None) -> list[tuple[Trigger, Outcome]]:
        """Start every due tick of every schedule. Blocking: run it in a thread."""
        now = now or self.clock()
        self.catalog.refresh()
        triggers: list[Trigger] = []
        handled: list[tuple[str, datetime]] = []
        for route in self.catalog.crons():
            plan = self._plan(route, now)
            if plan is None or plan.latest is None:
                continue
            v, spec = route.version, route.spec
            assert spec.cron is not None
            if plan.skipped:
                self.skipped += plan.skipped
                log.info("cron %s %r: skipped %d missed tick(s) (missed: %s)", v.name, spec.cron, plan.skipped,
                         spec.missed)
            for tick in plan.run:
                triggers.append(Trigger(tick_event(v.name, spec.cron, spec.timezone, tick), via="cron", routes=[route]))
            handled.append((tracking_name(v.name, spec.cron, spec.timezone), plan.latest))
        outcomes = self.ingestor.ingest(triggers) if triggers else []
        for o in outcomes:
            if o.status == "accepted":
                self.started += len(o.executions)
            else:
                self.duplicates += 1
        for name, latest in handled:
            try:
                self.store.track(name, int(latest.timestamp()))
            except ConcurrencyError:
                pass  # another scheduler recorded this tick (or a later one) first
        return list(zip(triggers, outcomes))

    def _plan(self, route: Route, now: datetime) -> TickPlan | None:
        v, spec = route.version, route.spec
        assert spec.cron is not None
        try:
            position = self.store.position(tracking_name(v.name, spec.cron, spec.timezone))
            last = datetime.fromtimestamp(position, timezone.utc) if position else v.published_at
            return plan_ticks(spec.cron, spec.timezone, last, now, missed=spec.missed, limit=spec.catch_up_limit,
                              grace=self.grace)
        except (ValueError, KeyError, ZoneInfoNotFoundError) as exc:
            key = (v.name, v.version, spec.cron)
            if key not in self._broken:
                self._broken.add(key)
                log.error("cron %s@%d %r (%s) cannot be scheduled: %s", v.name, v.version, spec.cron,
                          spec.timezone, exc)
            return None

    def next_wake(self, now: datetime) -> float:
        """Seconds until the next tick of any schedule (at most max_sleep, to notice new workflows)."""
        best = self.max_sleep
        for route in self.catalog.crons():
            spec = route.spec
            try:
                nxt = croniter(spec.cron, now.astimezone(ZoneInfo(spec.timezone))).get_next(datetime)
            except (ValueError, KeyError, ZoneInfoNotFoundError):
                continue
            best = min(best, (nxt - now).total_seconds())
        return max(best, 0.0) + 0.005

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                outcomes = await asyncio.to_thread(self.tick_once)
                await self._dead_letter(outcomes)
            except Exception:  # the store is away: the ticks stay due and run when it is back
                await backoff.failed(stop, log, "scheduler: a tick")
                continue
            backoff.reset()
            await sleep_or_stop(stop, self.next_wake(self.clock()))

    async def _dead_letter(self, outcomes: list[tuple[Trigger, Outcome]]) -> None:
        for trigger, o in outcomes:
            if not o.rejected:
                continue
            for label, why in o.rejected.items():
                log.warning("cron tick %s of %s not started: %s", o.id, label, why)
            if self.transport is not None:
                await dead_letter_rejected(self.transport, o, encode(trigger.event), source_subject=o.source)
