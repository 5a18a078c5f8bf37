"""The workflow registry: published versions are immutable and content-hashed.

Each workflow name is one stream in the event store; a version is an event at
that stream's next position, so two publishers racing for one version number
cannot both win (the store's unique (stream, version) settles it).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import orjson

from contracts.definitions import WorkflowDef
from contracts.workflows import WorkflowPublished
from services.store import ConcurrencyError, EventStore, NewEvent

_NS = uuid.UUID("6b0f4c43-2a53-4f0e-9b7a-8d1f3c1e5a10")


def workflow_stream(name: str) -> uuid.UUID:
    return uuid.uuid5(_NS, f"workflow:{name}")


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    content_hash: str
    definition: WorkflowDef
    published_at: datetime
    created: bool = False  # False when identical content was already published


class UnknownWorkflow(LookupError):
    pass


class Registry:
    def __init__(self, store: EventStore, clock: Callable[[], datetime] | None = None):
        self.store = store
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self._cache: dict[tuple[str, int], Version] = {}

    def publish(self, wf: WorkflowDef) -> Version:
        digest = wf.content_hash()
        for _ in range(10):
            versions = self.versions(wf.name)
            for v in versions:
                if v.content_hash == digest:
                    return v
            number = len(versions) + 1
            event = WorkflowPublished(
                at=self.clock(), name=wf.name, version=number, content_hash=digest, definition=wf.canonical()
            )
            data = orjson.dumps(event.model_dump(mode="json"))
            try:
                self.store.append([NewEvent(workflow_stream(wf.name), number, event.type, data)])
            except ConcurrencyError:
                continue  # someone published meanwhile: look again
            return Version(wf.name, number, digest, wf, event.at, created=True)
        raise ConcurrencyError(f"could not publish {wf.name}: too much contention")

    def versions(self, name: str) -> list[Version]:
        out = []
        for rec in self.store.load(workflow_stream(name)):
            out.append(self._version(orjson.loads(rec.data)))
        return out

    def get(self, name: str, version: int | None = None) -> Version:
        if version is not None and (name, version) in self._cache:
            return self._cache[(name, version)]
        versions = self.versions(name)
        if not versions:
            raise UnknownWorkflow(f"no workflow named {name!r}")
        if version is None:
            return versions[-1]
        for v in versions:
            if v.version == version:
                return v
        raise UnknownWorkflow(f"workflow {name!r} has no version {version}")

    def names(self) -> list[str]:
        names: set[str] = set()
        after = 0
        while True:
            batch = self.store.read(after, 1000, types=["WorkflowPublished"])
            if not batch:
                return sorted(names)
            for rec in batch:
                names.add(orjson.loads(rec.data)["name"])
            after = batch[-1].position

    def _version(self, raw: dict) -> Version:
        key = (raw["name"], raw["version"])
        if key not in self._cache:
            self._cache[key] = version_of(raw)
        return self._cache[key]


def version_of(raw: dict[str, Any]) -> Version:
    """A stored WorkflowPublished event (decoded JSON) as the Version it published."""
    e = WorkflowPublished.model_validate(raw)
    return Version(e.name, e.version, e.content_hash, WorkflowDef.model_validate(e.definition), e.at)
