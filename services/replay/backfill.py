"""Backfill: run past trigger events through a chosen workflow version.

Reads the trigger log (`TriggerAccepted` records) for events whose CloudEvent
`time` (or, without one, the time Weft received them) is in [start, end) and
whose type the workflow subscribes to (`on: - event: T`, with its `filter`),
or the given event type. Each event starts at most one execution per backfill
id: the execution id is `execution_id_for(W, "backfill:<id>:<source>:<event id>")`,
so an interrupted backfill, run again, skips what it started and carries on.
The backfill id is derived from (workflow, version, start, end, event types)
unless one is given. Events are run oldest first, at most `rate` starts per
second, and a `should_stop()` that turns true stops it cleanly between events.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import orjson

from contracts.payloads import PayloadError, is_ref
from contracts.triggers import TriggerAccepted
from services.orchestrator.decide import DecisionError
from services.orchestrator.executions import Executions, InputError, execution_id_for
from services.orchestrator.registry import Registry, UnknownWorkflow, Version
from services.replay.operations import Progress, Run, check_id, derive_id
from services.store.blobs import BlobNotFound
from services.store import EventStore


class BackfillError(ValueError):
    """Bad backfill parameters (unknown workflow or version, empty range...). Nothing was started."""

    code = "bad_input"


def parse_workflow(text: str) -> tuple[str, int | None]:
    """`W` or `W@VERSION`."""
    name, sep, version = text.partition("@")
    if not name:
        raise BackfillError(f"--workflow: expected NAME or NAME@VERSION, got {text!r}")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise BackfillError(f"--workflow: version must be a number >= 1, got {version!r}")
    return name, int(version)


def backfill_key(backfill_id: str, source: str, event_id: str) -> str:
    return f"backfill:{backfill_id}:{source}:{event_id}"


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None  # not a time: fall back to when Weft received the event
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _matcher(version: Version, event_type: str | None) -> Callable[[dict[str, Any]], bool]:
    from services.triggers.routing import matches  # the same filter semantics as live routing

    specs = [s for s in version.definition.on if s.event is not None]
    types = {event_type} if event_type else {s.event for s in specs}
    if not types:
        raise BackfillError(
            f"{version.name}@{version.version} subscribes to no event types (`on: - event: ...`); "
            "pass --event-type to choose the events"
        )

    def match(event: dict[str, Any]) -> bool:
        kind = event.get("type")
        if kind not in types:
            return False
        filters = [s.filter for s in specs if s.event == kind]
        return not filters or any(matches(f, event) for f in filters)

    return match


def find_events(
    store: EventStore, match: Callable[[dict[str, Any]], bool], start: datetime, end: datetime, *, page: int = 2000,
) -> list[dict[str, Any]]:
    """Recorded trigger events in [start, end) that `match`, oldest first (by event time, then log order)."""
    found: list[tuple[datetime, int, dict[str, Any]]] = []
    after = 0
    while True:
        batch = store.read(after, page, ["TriggerAccepted"])
        for rec in batch:
            accepted = TriggerAccepted.model_validate(orjson.loads(rec.data))
            event = accepted.event
            when = _time(event.get("time")) or accepted.at
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            if start <= when < end and match(event):
                found.append((when, rec.position, event))
        if len(batch) < page:
            break
        after = batch[-1].position
    found.sort(key=lambda x: (x[0], x[1]))
    return [{"time": t.isoformat(), "event": e} for t, _, e in found]


def backfill(
    store: EventStore, workflow: str, *, start: datetime, end: datetime, version: int | None = None,
    event_type: str | None = None, rate: float | None = None, dry_run: bool = False,
    backfill_id: str | None = None, progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None, sleep: Callable[[float], None] = time.sleep,
    allow: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Run the recorded trigger events of [start, end) through `workflow` (latest version unless given).

    Returns the report: id, counts (started, skipped as already done, failed),
    cancelled, and one item per event. Raises BackfillError for bad parameters.
    `allow`, when given, further limits the events (a bound API key's event binding): an event it
    refuses is neither started nor counted nor reported.
    """
    start, end = _time(start), _time(end)
    assert start is not None and end is not None
    if start >= end:
        raise BackfillError(f"--from must be before --to (got {start.isoformat()} .. {end.isoformat()})")
    if rate is not None and rate <= 0:
        raise BackfillError("--rate must be more than 0 per second")
    try:
        target = Registry(store).get(workflow, version)
    except UnknownWorkflow as exc:
        raise BackfillError(f"--workflow: {exc}") from None
    match = _matcher(target, event_type)
    if allow is not None:
        matched, match = match, (lambda event: matched(event) and allow(event))
    params = {"workflow": target.name, "version": target.version, "from": start.isoformat(),
              "to": end.isoformat(), "event_type": event_type}
    if backfill_id is not None:
        try:
            bid = check_id("--id", backfill_id)
        except ValueError as exc:
            raise BackfillError(str(exc)) from None
    else:
        bid = derive_id("backfill", params)
    events = find_events(store, match, start, end)
    run = Run(store, bid, "backfill", params, len(events), dry_run=dry_run, progress=progress)
    executions = Executions(store)
    cancelled = False
    began = time.monotonic()
    starts = 0
    for found in events:
        if should_stop is not None and should_stop():
            cancelled = True
            break
        e = found["event"]
        key = backfill_key(bid, e["source"], e["id"])
        eid = execution_id_for(target.name, key)
        item: dict[str, Any] = {"id": e["id"], "source": e["source"], "type": e.get("type"), "time": found["time"],
                                "execution_id": eid}
        if store.load(uuid.UUID(eid), upto_version=1):
            item["outcome"] = "skipped"
        elif dry_run:
            item["outcome"] = "would_start"
        else:
            if rate is not None:  # pace the starts only: resuming skips done events at full speed
                if _wait(began + starts / rate, sleep, should_stop):
                    cancelled = True
                    break
                starts += 1
            trigger = {"id": e["id"], "source": e["source"], "type": e.get("type"), "subject": e.get("subject"),
                       "time": e.get("time"), "via": "backfill", "backfill": bid}
            data = {} if e.get("data") is None else e["data"]
            try:
                if is_ref(data):  # a big trigger's data, kept by reference in the trigger log
                    data = executions.claims.resolve(data)
                _, created = executions.start(target, data, trigger=trigger, idempotency_key=key)
                item["outcome"] = "started" if created else "skipped"
            except (InputError, DecisionError, PayloadError, BlobNotFound) as exc:
                item["outcome"], item["error"] = "failed", str(exc)
        run.add(item)
    return {
        "id": bid, "backfill_id": bid, "kind": "backfill", "workflow": target.name, "version": target.version,
        "from": start.isoformat(), "to": end.isoformat(),
        "event_types": [event_type] if event_type else sorted({s.event for s in target.definition.on if s.event}),
        "dry_run": dry_run, **run.finish(cancelled=cancelled), "remaining": len(events) - len(run.items),
        "items": run.items,
    }


def _wait(until: float, sleep: Callable[[float], None], should_stop: Callable[[], bool] | None) -> bool:
    """Sleep until the monotonic time `until`, in small steps; True if told to stop meanwhile."""
    while True:
        left = until - time.monotonic()
        if should_stop is not None and should_stop():
            return True
        if left <= 0:
            return False
        sleep(min(left, 0.1))
