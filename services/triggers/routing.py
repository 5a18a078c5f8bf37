"""The catalog of published workflows and the routing of trigger events.

The catalog holds the latest version of every workflow, read from the
`WorkflowPublished` events of the store. It refreshes incrementally: each
refresh reads only the part of the notification log written since the last
one, so refreshing before every batch costs one small query.

Filter semantics (`on: [{event: order.created, filter: {...}}]`): the filter
is a mapping from a path into the CloudEvent to what the value there must be.
A path is dotted: `source`, `subject`, `type`, `data.region`,
`data.items.0.sku`, or any extension attribute; a key with no dot names a
top-level attribute. The wanted value is either
  - a scalar (string, number, boolean, null): the value must be equal to it
    (`true` does not equal `1`);
  - a list: the value must equal one of its members (to require a list value,
    wrap it: `[[1, 2]]`);
  - a mapping: its keys are paths below this one (`{data: {region: eu}}` is the
    same as `{data.region: eu}`).
Every entry must match (AND). A path that is missing in the event does not
match (not even `null`). An event whose type some workflow subscribes to but
whose filters all fail is recorded in the trigger log with no execution
(`TriggerAccepted.filtered`); an event whose type nobody subscribes to is
dead-lettered as unroutable.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

import orjson

from contracts.definitions import TriggerSpec
from contracts.subjects import trigger_subject
from services.orchestrator.registry import Version, version_of
from services.store import EventStore

_MISSING = object()


def lookup(event: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a CloudEvent (as JSON), or _MISSING."""
    value: Any = event
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit():
            index = int(part)
            value = value[index] if index < len(value) else _MISSING
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _same(a: Any, b: Any) -> bool:
    # JSON equality without Python's True == 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def _flatten(spec: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, wanted in spec.items():
        path = f"{prefix}{key}"
        if isinstance(wanted, dict):
            yield from _flatten(wanted, path + ".")
        else:
            yield path, wanted


def matches(spec: dict[str, Any] | None, event: dict[str, Any]) -> bool:
    """Does the CloudEvent (as JSON) pass the filter? No filter passes everything."""
    if not spec:
        return True
    for path, wanted in _flatten(spec):
        value = lookup(event, path)
        if value is _MISSING:
            return False
        if isinstance(wanted, list):
            if not any(_same(value, w) for w in wanted):
                return False
        elif not _same(value, wanted):
            return False
    return True


@dataclass(frozen=True, slots=True)
class Route:
    version: Version
    spec: TriggerSpec

    @property
    def label(self) -> str:
        return f"{self.version.name}@{self.version.version}"


@dataclass(frozen=True, slots=True)
class Routing:
    """Where one event goes: the matching routes, and the subscribers its filter left out."""

    routes: list[Route]
    filtered: list[str]
    subscribed: bool  # False: no workflow subscribes to this event type at all


class Catalog:
    """Latest version of every workflow, and the routing tables derived from them. Thread-safe."""

    def __init__(self, store: EventStore, *, min_interval: float = 0.1):
        self.store = store
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._scanned = 0  # the log has been read for WorkflowPublished up to here
        self._checked = 0.0  # monotonic time of the last refresh
        self._latest: dict[str, Version] = {}
        self._by_type: dict[str, list[Route]] = {}
        self._by_path: dict[str, list[Route]] = {}
        self._crons: list[Route] = []

    # ---- keeping up -------------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> bool:
        """Read the WorkflowPublished events written since last time; True if anything changed."""
        if not force and time.monotonic() - self._checked < self.min_interval:
            return False
        with self._lock:
            if not force and time.monotonic() - self._checked < self.min_interval:
                return False
            changed = False
            latest = dict(self._latest)  # readers keep the old one until it is complete
            while True:
                batch, scanned = self.store.follow(self._scanned, 1000, ["WorkflowPublished"])
                for rec in batch:
                    changed |= _add(latest, orjson.loads(rec.data))
                self._scanned = scanned
                if len(batch) < 1000:
                    break
            self._checked = time.monotonic()
            if changed:
                self._latest = latest
                self._rebuild()
            return changed

    def _rebuild(self) -> None:
        by_type: dict[str, list[Route]] = {}
        by_path: dict[str, list[Route]] = {}
        crons: list[Route] = []
        for name in sorted(self._latest):
            version = self._latest[name]
            for spec in version.definition.on:
                if spec.event is not None:
                    by_type.setdefault(spec.event, []).append(Route(version, spec))
                elif spec.webhook is not None:
                    by_path.setdefault(normalise_path(spec.webhook.path), []).append(Route(version, spec))
                elif spec.cron is not None:
                    crons.append(Route(version, spec))
        self._by_type, self._by_path, self._crons = by_type, by_path, crons

    # ---- reading ----------------------------------------------------------------------------

    def latest(self) -> dict[str, Version]:
        return dict(self._latest)

    def get(self, name: str) -> Version | None:
        return self._latest.get(name)

    def subscribers(self, event_type: str) -> list[Route]:
        return list(self._by_type.get(event_type, ()))

    def types(self) -> dict[str, list[Route]]:
        """Every subscribed event type and its routes (latest version of each workflow)."""
        return {t: list(routes) for t, routes in self._by_type.items()}

    def route(self, event: dict[str, Any]) -> Routing:
        """The workflows this CloudEvent (as JSON) starts: one route per workflow at most."""
        subs = self._by_type.get(event.get("type", ""), [])
        routes: list[Route] = []
        filtered: list[str] = []
        taken: set[str] = set()
        for route in subs:
            if route.version.name in taken:
                continue  # two `on:` entries of one workflow: one execution per event
            if matches(route.spec.filter, event):
                routes.append(route)
                taken.add(route.version.name)
        for route in subs:
            if route.version.name not in taken and route.label not in filtered:
                filtered.append(route.label)
        return Routing(routes, filtered, bool(subs))

    def webhooks(self, path: str) -> list[Route]:
        """The workflows listening on a webhook path (`route.spec.webhook` has its secret's name)."""
        return list(self._by_path.get(normalise_path(path), ()))

    def crons(self) -> list[Route]:
        return list(self._crons)


def _add(latest: dict[str, Version], raw: dict[str, Any]) -> bool:
    current = latest.get(raw["name"])
    if current is not None and current.version >= raw["version"]:
        return False
    latest[raw["name"]] = version_of(raw)
    return True


def normalise_path(path: str) -> str:
    """`orders`, `/orders` and `/orders/` name one webhook."""
    return "/" + path.strip("/")


def subscribed_types(catalog: Catalog, workflows: frozenset[str] | None = None) -> list[dict[str, Any]]:
    """Every subscribed CloudEvent type, its topic, and the workflows (latest versions) it starts
    with their `input_schema` and filters: what a producer needs to know to send it (`GET
    /v1/triggers/types`, `weft trigger-types`). With `workflows` (a bound key's), only those
    workflows and the types they subscribe to."""
    out = []
    for event_type, routes in sorted(catalog.types().items()):
        seen: dict[str, dict[str, Any]] = {}
        for route in routes:
            v = route.version
            if workflows is not None and v.name not in workflows:
                continue
            entry = seen.setdefault(v.name, {"name": v.name, "version": v.version,
                                             "input_schema": v.definition.input_schema, "filters": []})
            if route.spec.filter is None:
                entry["unfiltered"] = True  # two `on:` entries for one type: this one lets every event in
            else:
                entry["filters"].append(route.spec.filter)
        for entry in seen.values():
            if entry.pop("unfiltered", False):
                entry["filters"] = []
        if seen:
            out.append({"type": event_type, "topic": trigger_subject(event_type), "workflows": list(seen.values())})
    return out
