"""Operation ids and records: what makes a bulk replay or a backfill idempotent and auditable."""

from __future__ import annotations

import getpass
import hashlib
import os
import re
from datetime import datetime, timezone
from typing import Any, Callable

import orjson

from contracts.operations import OperationFinished, OperationKind, OperationStarted, operation_stream
from services.store import ConcurrencyError, EventStore, NewEvent

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
Progress = Callable[[int, int, dict[str, Any]], None]  # (done, total, item just done)


def derive_id(prefix: str, params: dict[str, Any]) -> str:
    """A stable id from an operation's parameters: the same command names the same operation."""
    digest = hashlib.sha256(orjson.dumps(params, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{prefix}-{digest[:16]}"


def check_id(name: str, value: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"{name}: use 1-128 letters, digits and _ . : - (got {value!r})")
    return value


def user() -> str:
    try:
        return os.environ.get("WEFT_USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"


def record(store: EventStore, event: OperationStarted | OperationFinished, *, attempts: int = 10) -> None:
    """Append to the operation's stream (next version; retried if another run appends meanwhile)."""
    stream = operation_stream(event.operation_id)
    data = orjson.dumps(event.model_dump(mode="json"))
    for _ in range(attempts):
        version = len(store.load(stream)) + 1
        try:
            store.append([NewEvent(stream, version, event.type, data)])
            return
        except ConcurrencyError:
            continue
    raise ConcurrencyError(
        f"operation {event.operation_id}: could not append its {event.type} after {attempts} tries "
        "(other runs of the same operation kept appending)", kind="version", operation="record",
    )


def history(store: EventStore, operation_id: str) -> list[dict[str, Any]]:
    """Every run of an operation: its records, oldest first."""
    return [orjson.loads(r.data) for r in store.load(operation_stream(operation_id))]


class Run:
    """One run of an operation: records its start and end, collects the items and their outcomes."""

    OUTCOMES = ("started", "skipped", "failed", "would_start")

    def __init__(self, store: EventStore, operation_id: str, kind: OperationKind, params: dict[str, Any],
                 total: int, *, dry_run: bool, progress: Progress | None = None,
                 clock: Callable[[], datetime] | None = None):
        self.store, self.operation_id, self.kind, self.dry_run = store, operation_id, kind, dry_run
        self.total, self.progress = total, progress
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.counts = {"started": 0, "skipped": 0, "failed": 0}
        self.failures: list[dict[str, Any]] = []
        self.items: list[dict[str, Any]] = []
        if not dry_run:
            record(store, OperationStarted(at=self.clock(), operation_id=operation_id, kind=kind, params=params,
                                           total=total, by=user()))

    def add(self, item: dict[str, Any]) -> None:
        """An item done: `item["outcome"]` is one of OUTCOMES."""
        outcome = item["outcome"]
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if outcome == "failed" and len(self.failures) < 100:
            self.failures.append(item)
        self.items.append(item)
        if self.progress is not None:
            self.progress(len(self.items), self.total, item)

    def finish(self, *, cancelled: bool) -> dict[str, Any]:
        """Record the end; returns the report's counts: total, one per outcome, cancelled."""
        if not self.dry_run:
            record(self.store, OperationFinished(at=self.clock(), operation_id=self.operation_id, kind=self.kind,
                                                 counts=self.counts, cancelled=cancelled, failures=self.failures))
        return {"total": self.total, **{k: self.counts.get(k, 0) for k in self.OUTCOMES}, "cancelled": cancelled}
