"""The timeline view: every event of every execution, in order, with a one-line detail."""

from __future__ import annotations

from typing import Any, Sequence

import orjson

from services.projections.tables import Ev, TableSpec, TableView, write_rows
from services.store import ViewTransaction

_COLUMNS = (
    ("execution_id", "TEXT NOT NULL"), ("seq", "INTEGER NOT NULL"), ("position", "BIGINT NOT NULL"),
    ("at", "TEXT NOT NULL"), ("type", "TEXT NOT NULL"), ("step_id", "TEXT"), ("item", "INTEGER"),
    ("attempt", "INTEGER"), ("detail", "TEXT"),
)
_NAMES = tuple(c for c, _ in _COLUMNS)
_DETAIL_MAX = 200

EXECUTION_EVENTS = (
    "ExecutionStarted", "StepMapped", "StepScheduled", "StepSucceeded", "StepFailed", "StepSkipped",
    "StepDeadLettered", "StepResultIgnored", "StepReprocessRequested", "ExecutionCompleted", "ExecutionFailed",
    "ExecutionCancelled", "ExecutionPaused", "ExecutionResumed", "ExecutionRetried",
)


class TimelineView(TableView):
    name = "view:timeline"
    cost = 3  # relative database work per event: spreads views over lanes
    version = 1
    types = EXECUTION_EVENTS
    tables = {"timeline": TableSpec(_COLUMNS, ("execution_id", "seq"))}

    @property
    def table(self) -> str:
        return self.t["timeline"]

    def apply_events(self, tx: ViewTransaction, events: Sequence[Ev]) -> None:
        rows = []
        for rec in events:
            e = rec.data
            rows.append((
                rec.stream, rec.version, rec.position, rec.at, rec.type, e.get("step_id"),
                e.get("item"), e.get("attempt"), detail(rec.type, e),
            ))
        write_rows(tx, self.table, self.tables["timeline"], rows)


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"


def detail(kind: str, e: dict[str, Any]) -> str | None:
    """What a person scanning the timeline needs to see of one event."""
    if kind == "ExecutionStarted":
        text = f"{e['workflow']}@{e['version']}"
        if e.get("replay_of"):
            text += f" replay of {e['replay_of']}"
            if e.get("reused"):
                text += f" reusing {', '.join(sorted(e['reused']))}"
        return text
    if kind == "StepScheduled":
        text = e.get("reason") or "ready"
        return text + (f" not before {e['not_before']}" if e.get("not_before") else "")
    if kind in ("StepSucceeded", "ExecutionCompleted"):
        prefix = f"reused from {e['reused_from']}: " if e.get("reused_from") else ""
        return (prefix + _short(e.get("output")))[:_DETAIL_MAX]
    if kind in ("StepFailed", "StepDeadLettered", "ExecutionFailed"):
        text = f"{e['error_type']}: {e['error_message']}"
        if kind == "StepDeadLettered":
            text = f"{e['reason']}: {text}"
        return text[:_DETAIL_MAX]
    if kind in ("StepSkipped", "StepResultIgnored"):
        return e.get("reason")
    if kind == "StepMapped":
        return f"{e['count']} items"
    if kind in ("ExecutionCancelled", "ExecutionPaused", "ExecutionResumed", "ExecutionRetried",
                "StepReprocessRequested"):
        text = f"by {e.get('by', 'user')}" + (f": {e['why']}" if e.get("why") else "")
        if e.get("patch") is not None:
            text += f" patch {_short(e['patch'])}"
        return text[:_DETAIL_MAX]
    return None


def timeline(tx: ViewTransaction, execution_id: str, *, table: str = "weft_timeline") -> list[dict[str, Any]]:
    tx.execute(f"SELECT {', '.join(_NAMES)} FROM {table} WHERE execution_id = ? ORDER BY seq", (execution_id,))
    out = []
    for row in tx.fetchall():
        r = dict(zip(_NAMES, row))
        r["id"] = f"{execution_id}:{r['seq']}"
        out.append(r)
    return out
