"""Ingestion: trigger events in, trigger-log records and started executions out.

Every trigger (topic, webhook, cron) goes through `Ingestor.ingest`. For a
batch of CloudEvents it asks the execution service (the one writer of
execution events, `Executions.apply`) to store, in ONE transaction:
  - a `TriggerAccepted` per event, at version 1 of `trigger_stream(source, id)`
    (a rider of the event's starts, so neither is stored without the other);
  - for each workflow the event starts, a `Start` of the execution
    `execution_id_for(workflow, "trigger:<source>:<id>")`.
Both stream ids are functions of (source, id), so an event seen before, even
long after the broker's dedup window, collides on a version-1 record: the
batch is refused as a whole and we fall back to one event at a time, where
the collision marks that event a duplicate. Nothing is half-stored.

Blocking (it talks to the store): call it from a thread.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Sequence

import orjson

from contracts.definitions import validate_input
from contracts.payloads import PayloadError, is_ref, ref_digest
from contracts.triggers import CloudEvent, TriggerAccepted, trigger_stream
from services.orchestrator.decide import Start
from services.orchestrator.executions import Applied, Change, Executions, execution_id_for
from services.store import ConcurrencyError, NewEvent, StoreError
from services.triggers.routing import Catalog, Route

log = logging.getLogger("weft.triggers")


def trigger_key(source: str, event_id: str) -> str:
    """The idempotency key a trigger event gives the executions it starts."""
    return f"trigger:{source}:{event_id}"


def trigger_execution_id(workflow: str, source: str, event_id: str) -> str:
    return execution_id_for(workflow, trigger_key(source, event_id))


@dataclass(slots=True)
class Trigger:
    """One event to ingest. `routes` given (webhook, cron) or None (route by type)."""

    event: CloudEvent
    via: str = "topic"
    routes: list[Route] | None = None
    filtered: list[str] = field(default_factory=list)
    trace_id: str | None = None  # the traceparent its executions record (services/telemetry/observed.py)
    raw: dict[str, Any] = field(init=False)  # the event as JSON: what filters read and the trigger log keeps
    stream: uuid.UUID = field(init=False)  # its trigger-log stream, named by (source, id)

    def __post_init__(self) -> None:
        self.raw = self.event.model_dump(mode="json")
        self.stream = trigger_stream(self.event.source, self.event.id)


@dataclass(slots=True)
class Outcome:
    status: str  # accepted | duplicate | unroutable
    source: str
    id: str
    executions: dict[str, str] = field(default_factory=dict)  # "workflow@version" -> execution id
    rejected: dict[str, str] = field(default_factory=dict)  # "workflow@version" -> why not started
    filtered: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass(slots=True)
class _Plan:
    trigger: Trigger
    at: datetime
    raw: dict[str, Any]  # the event as its log entry keeps it (big data by reference)
    starts: dict[str, Change]  # label -> the start of that workflow's execution
    rejected: dict[str, str]
    executions: dict[str, str] = field(default_factory=dict)  # as stored: label -> execution id
    refused: dict[str, str] = field(default_factory=dict)  # as stored: the rejected, and starts the core refused

    def changes(self, group: int, skip: frozenset[uuid.UUID] = frozenset()) -> list[Change]:
        """The trigger's log entry and its starts, all or nothing (`skip`: executions taken by hand)."""
        starts = [c for c in self.starts.values() if uuid.UUID(c.execution_id) not in skip]
        return [Change("", None, riders=self._head, group=group), *(
            Change(c.execution_id, c.command, group=group) for c in starts)]

    def _head(self, applied: Sequence[Applied]) -> list[NewEvent]:
        by_id = {a.change.execution_id: a for a in applied if a.change.command is not None}
        executions, rejected = {}, dict(self.rejected)
        for label, c in self.starts.items():
            a = by_id.get(c.execution_id)
            if a is None or a.status in ("applied", "exists"):
                executions[label] = c.execution_id  # a start skipped as taken stands for ours
            else:
                rejected[label] = f"cannot start: {a.reason}"
        self.executions, self.refused = executions, rejected
        accepted = TriggerAccepted(at=self.at, event=self.raw, via=self.trigger.via, executions=executions,
                                   filtered=list(self.trigger.filtered), rejected=rejected)
        return [NewEvent(self.trigger.stream, 1, accepted.type, orjson.dumps(accepted.model_dump(mode="json")))]


class Ingestor:
    def __init__(self, executions: Executions, catalog: Catalog, *, clock: Callable[[], datetime] | None = None):
        self.executions, self.catalog = executions, catalog
        self.store = executions.store  # read only: every write goes through `executions.apply`
        self.clock = clock or executions.clock
        self.claims = executions.claims
        # counters, for tests and benchmarks
        self.accepted = 0
        self.duplicates = 0
        self.started = 0
    def ingest(self, triggers: Sequence[Trigger]) -> list[Outcome]:
        """Record the triggers and start their executions; one outcome per trigger, in order."""
        self.catalog.refresh()
        routed = [self._route(t) for t in triggers]
        if any(r is None for r in routed) and self.catalog.refresh(force=True):
            # A workflow published a moment ago may be what this event is for.
            routed = [r if r is not None else self._route(t) for t, r in zip(triggers, routed)]
        now = self.clock()
        outcomes: list[Outcome | None] = [None] * len(triggers)
        first: dict[uuid.UUID, int] = {}  # trigger stream -> index of its first occurrence in the batch
        plans: list[tuple[int, _Plan]] = []
        for i, (t, routes) in enumerate(zip(triggers, routed)):
            if routes is None:
                outcomes[i] = Outcome("unroutable", t.event.source, t.event.id,
                                      reason=f"no workflow subscribes to event type {t.event.type!r}")
                continue
            if t.stream in first:
                continue  # the same event twice in one batch: settled after the first is stored
            first[t.stream] = i
            plans.append((i, self._plan(t, routes, now)))
        if plans:
            for i, outcome in self._store(plans).items():
                outcomes[i] = outcome
        for i, t in enumerate(triggers):
            if outcomes[i] is None:  # a repeat within the batch
                o = outcomes[first[t.stream]]
                assert o is not None
                outcomes[i] = Outcome("duplicate", o.source, o.id, dict(o.executions), dict(o.rejected), list(o.filtered))
                self.duplicates += 1
        return [o for o in outcomes if o is not None]

    # ---- planning ---------------------------------------------------------------------------

    def _route(self, t: Trigger) -> list[Route] | None:
        if t.routes is not None:
            return t.routes
        routing = self.catalog.route(t.raw)
        if not routing.subscribed:
            return None
        t.filtered = routing.filtered
        return routing.routes

    def _plan(self, t: Trigger, routes: list[Route], now: datetime) -> _Plan:
        e = t.event
        data = {} if e.data is None else e.data
        rejected: dict[str, str] = {}
        starts: dict[str, Change] = {}
        about = {"id": e.id, "source": e.source, "type": e.type, "subject": e.subject,
                 "time": t.raw.get("time"), "via": t.via}
        raw = t.raw
        try:
            data, plain = self._payload(t, data)
        except (PayloadError, StoreError) as exc:
            if isinstance(exc, StoreError) and exc.transient:
                raise  # the batch is retried
            plain, why = None, str(exc)
            rejected = {route.label: why for route in routes}
            routes = []
        if data is not e.data and e.data is not None:
            raw = {**t.raw, "data": data}  # the trigger log keeps the reference, not the bytes again
        planned: set[str] = set()
        for route in routes:
            v = route.version
            if v.name in planned:
                continue  # two `on:` entries of one workflow (say, one webhook path twice): one execution
            planned.add(v.name)
            problems = validate_input(v.definition, plain)
            if problems:
                rejected[route.label] = "invalid input: " + "; ".join(str(p) for p in problems)
                continue
            eid = trigger_execution_id(v.name, e.source, e.id)
            cmd = Start(definition=v.definition, version=v.version, content_hash=v.content_hash, input=data,
                        trigger=about, idempotency_key=trigger_key(e.source, e.id), trace_id=t.trace_id)
            starts[route.label] = Change(eid, cmd)
        return _Plan(t, now, raw, starts, rejected)

    def _payload(self, t: Trigger, data: Any) -> tuple[Any, Any]:
        """(what the execution's input will be, the plain value to validate). A trigger that
        came over the broker may carry its data by reference (`weft publish`, POST /v1/triggers
        store big data first); from anywhere else a reference is refused, like over the maximum.
        Big plain data is stored here, once, so the trigger log and the execution share it."""
        if t.via == "topic" and is_ref(data):
            return data, self.claims.load(ref_digest(data))
        encoded = self.claims.check(data, "the trigger's data")
        return self.claims.store(data, encoded), data

    # ---- storing ----------------------------------------------------------------------------

    def _store(self, plans: list[tuple[int, _Plan]]) -> dict[int, Outcome]:
        """One `apply` for the whole batch; a trigger whose streams collided is settled on its own."""
        out: dict[int, Outcome] = {}
        changes = [c for i, p in plans for c in p.changes(i)]
        applied = self.executions.apply(changes, cache=False)
        collided: dict[int, frozenset[uuid.UUID]] = {}
        for a in applied:
            if a.status == "conflict":
                collided[a.change.group] = collided.get(a.change.group, frozenset()) | a.collided
        for i, p in plans:
            out[i] = self._append_one(p, i, collided[i]) if i in collided else self._accepted(p)
        return out

    def _accepted(self, plan: _Plan) -> Outcome:
        self.accepted += 1
        self.started += len(plan.executions)
        e = plan.trigger.event
        return Outcome("accepted", e.source, e.id, dict(plan.executions), dict(plan.refused), list(plan.trigger.filtered))

    def _append_one(self, plan: _Plan, group: int, collided: frozenset[uuid.UUID]) -> Outcome:
        skip: frozenset[uuid.UUID] = frozenset()
        for _ in range(5):
            stored = self.store.load(plan.trigger.stream, upto_version=1)
            if stored:  # seen before
                self.duplicates += 1
                return self._duplicate(plan, TriggerAccepted.model_validate_json(stored[0].data))
            # The trigger is new but an execution id is taken: someone started that
            # execution with the same key by hand. It stands for this trigger's; keep it.
            skip |= {s for s in collided if s != plan.trigger.stream and self.store.load(s, upto_version=1)}
            applied = self.executions.apply(plan.changes(group, skip), cache=False)
            conflict = [a for a in applied if a.status == "conflict"]
            if not conflict:
                return self._accepted(plan)
            collided = frozenset().union(*(a.collided for a in conflict))
        raise ConcurrencyError(f"trigger {plan.trigger.event.source}:{plan.trigger.event.id}: too much contention",
                               kind="version")

    def _duplicate(self, plan: _Plan, prior: TriggerAccepted) -> Outcome:
        """A repeat starts nothing new, except for a workflow that rejected the event's data the
        first time: a corrected event (a reprocessed dead letter) may start it now, still at
        most once, since its execution id is the same."""
        started = {_name(label) for label in prior.executions}
        executions, rejected = dict(prior.executions), dict(prior.rejected)
        for label in prior.rejected:
            name = _name(label)
            if name in started:
                continue
            fresh = next((lbl for lbl in plan.starts if _name(lbl) == name), None)
            if fresh is not None:
                [a] = self.executions.apply([plan.starts[fresh]])  # exists: started by an earlier repeat
                if a.status == "applied":
                    self.started += 1
                if a.status in ("applied", "exists"):
                    executions[fresh] = plan.starts[fresh].execution_id
                    del rejected[label]
                else:
                    rejected[label] = f"cannot start: {a.reason}"
            else:
                again = next((lbl for lbl in plan.rejected if _name(lbl) == name), None)
                if again is not None:
                    rejected[label] = plan.rejected[again]
        e = plan.trigger.event
        return Outcome("duplicate", e.source, e.id, executions, rejected, list(prior.filtered))


def _name(label: str) -> str:
    return label.rpartition("@")[0]
