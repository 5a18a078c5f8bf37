"""The dead-letter view: one row per dead letter, built from the notification log.

Step dead letters come straight from `StepDeadLettered` events (the execution's
history up to that event, read in the view's own transaction, supplies the
workflow, the attempt's input and the traceback of its `StepFailed`); message
dead letters from `DeadLetterRecorded`. Acts (`DeadLetterReprocessed`,
`DeadLetterDiscarded`, `DeadLetterSeen`, and a reprocess or retry done straight
on the execution) move the status. A projection like the others: followed by
the projector (and by the dead-letter service, which wakes it as soon as it
stores one), shown by `weft projections status`, rebuilt by `weft projections
rebuild dead_letters`. The queries on it live in services.deadletters.view.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Sequence

import orjson

from contracts import deadletters as dl
from contracts.subjects import RESULTS_PREFIX, STEPS_PREFIX, TRIGGERS_PREFIX, step_subject
from services.projections.tables import Ev, TableSpec, TableView, write_rows
from services.store import ViewTransaction

_COLUMNS = (
    ("id", "TEXT NOT NULL"), ("seq", "BIGINT NOT NULL"), ("source", "TEXT NOT NULL"), ("kind", "TEXT NOT NULL"),
    ("status", "TEXT NOT NULL"), ("workflow", "TEXT"), ("execution_id", "TEXT"), ("step_id", "TEXT"),
    ("item", "INTEGER"), ("attempt", "INTEGER"), ("source_subject", "TEXT"), ("payload", "TEXT"),
    ("payload_encoding", "TEXT NOT NULL"), ("headers", "TEXT NOT NULL"), ("error_type", "TEXT"),
    ("error_message", "TEXT"), ("traceback", "TEXT"), ("reason", "TEXT"), ("delivered", "INTEGER NOT NULL"),
    ("first_seen", "TEXT NOT NULL"), ("last_seen", "TEXT NOT NULL"), ("actor", "TEXT"), ("action_reason", "TEXT"),
    ("acted_at", "TEXT"), ("details", "TEXT NOT NULL"),
    ("position", "BIGINT NOT NULL"),  # the last event that changed the row
)
COLUMNS = tuple(c for c, _ in _COLUMNS[:-1])  # what a read returns
JSON_COLUMNS = ("headers", "details")
TABLE = "weft_dead_letters"  # the live table (default prefix), which the queries read


def ts(value: datetime | str) -> str:
    """One fixed text form for times, so they compare as strings in SQL on both backends."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class DeadLettersView(TableView):
    name = "view:dead_letters"
    cost = 1
    version = 1
    types = ("StepDeadLettered", "StepReprocessRequested", "ExecutionRetried", *dl.EVENT_TYPES)
    tables = {
        "dead_letters": TableSpec(_COLUMNS, ("id",), indexes=(
            ("status", ("status", "kind", "workflow")), ("execution", ("execution_id", "step_id")), ("seq", ("seq",)),
        )),
    }

    def apply_events(self, tx: ViewTransaction, events: Sequence[Ev]) -> None:
        table = self.t["dead_letters"]
        new: dict[str, tuple[Any, ...]] = {}
        for e in events:
            if e.type in ("StepDeadLettered", "DeadLetterRecorded"):
                row = _step_row(tx, e) if e.type == "StepDeadLettered" else _message_row(tx, e)
                new.setdefault(row["id"], (*(_db(c, row.get(c)) for c in COLUMNS), e.position))
                continue
            self._insert(tx, new)  # rows first: a later act in this batch may update them
            d, at = e.data, ts(e.data["at"])
            if e.type == "StepReprocessRequested":
                item_sql = "item IS NULL" if d.get("item") is None else "item = ?"
                params: tuple[Any, ...] = (d.get("by"), d.get("why"), at, e.position, e.stream, d["step_id"])
                tx.execute(
                    f"UPDATE {table} SET status = 'reprocessed', actor = ?, action_reason = ?, acted_at = ?, position = ? "
                    f"WHERE execution_id = ? AND source = 'step' AND status = 'open' AND step_id = ? AND {item_sql}",
                    params if d.get("item") is None else (*params, d["item"]),
                )
            elif e.type == "ExecutionRetried":
                tx.execute(
                    f"UPDATE {table} SET status = 'reprocessed', actor = ?, action_reason = ?, acted_at = ?, position = ? "
                    "WHERE execution_id = ? AND source = 'step' AND status = 'open'",
                    (d.get("by"), d.get("why") or "execution retried", at, e.position, e.stream),
                )
            elif e.type == "DeadLetterSeen":
                tx.execute(
                    f"UPDATE {table} SET last_seen = ?, delivered = CASE WHEN delivered > ? THEN delivered ELSE ? END, "
                    "position = ? WHERE id = ?",
                    (at, d.get("delivered", 0), d.get("delivered", 0), e.position, d["dead_letter_id"]),
                )
            elif e.type in ("DeadLetterReprocessed", "DeadLetterDiscarded"):
                status = dl.REPROCESSED if e.type == "DeadLetterReprocessed" else dl.DISCARDED
                tx.execute(
                    f"UPDATE {table} SET status = ?, actor = ?, action_reason = ?, acted_at = ?, position = ? WHERE id = ?",
                    (status, d.get("by"), d.get("why"), at, e.position, d["dead_letter_id"]),
                )
        self._insert(tx, new)

    def _insert(self, tx: ViewTransaction, rows: dict[str, tuple[Any, ...]]) -> None:
        if rows:
            write_rows(tx, self.t["dead_letters"], self.tables["dead_letters"], list(rows.values()))
            rows.clear()


def _step_row(tx: ViewTransaction, e: Ev) -> dict[str, Any]:
    d = e.data
    step_id, item, attempt = d["step_id"], d.get("item"), d.get("attempt", 0)
    workflow = None
    started: dict[str, Any] = {}
    scheduled: dict[str, Any] = {}
    failed: dict[str, Any] = {}
    attempts = 0
    # The history up to this event never changes, so a rebuild derives the same row.
    for _, _, _, kind, data in tx.read_stream(e.stream, upto_version=e.version):
        if kind not in ("ExecutionStarted", "StepScheduled", "StepFailed"):
            continue
        x = orjson.loads(data)
        if kind == "ExecutionStarted":
            started, workflow = x, x.get("workflow")
        elif x.get("step_id") == step_id and x.get("item") == item:
            if kind == "StepScheduled":
                attempts += 1
                if x.get("attempt") == attempt:
                    scheduled = x
            elif x.get("attempt") == attempt:
                failed = x
    # Without a scheduled attempt the step's input could not be computed: what the
    # mapping ran on (the execution's input) is what there is to look at.
    payload = orjson.dumps(scheduled.get("input") if scheduled else started.get("input")).decode()
    mapping = next((s.get("input") for s in (started.get("definition") or {}).get("steps", [])
                    if s.get("id") == step_id), None)
    details = {
        "input_mapping": mapping,
        "execution_version": e.version,
        "idempotency_key": scheduled.get("idempotency_key"),
        "step_type": scheduled.get("step_type"),
        "config": scheduled.get("config"),
        "worker_id": failed.get("worker_id"),
        "attempts": attempts,
    }
    return {
        "id": dl.step_dead_letter_id(e.stream, e.version), "seq": e.position, "source": "step",
        "kind": dl.step_kind(d.get("reason", "")), "status": dl.OPEN, "workflow": workflow,
        "execution_id": e.stream, "step_id": step_id, "item": item, "attempt": attempt,
        "source_subject": step_subject(scheduled["step_type"]) if scheduled.get("step_type") else None,
        "payload": payload, "payload_encoding": "utf-8", "headers": {},
        "error_type": d.get("error_type"), "error_message": d.get("error_message"),
        "traceback": failed.get("traceback"), "reason": d.get("reason"), "delivered": attempts,
        "first_seen": ts(d["at"]), "last_seen": ts(d["at"]), "details": details,
    }


def _message_row(tx: ViewTransaction, e: Ev) -> dict[str, Any]:
    d = e.data
    row: dict[str, Any] = {
        "id": d["dead_letter_id"], "seq": e.position, "source": "message", "kind": d["kind"], "status": dl.OPEN,
        "source_subject": d.get("source_subject") or None, "payload": d["payload"],
        "payload_encoding": d.get("payload_encoding", "utf-8"), "headers": d.get("headers") or {},
        "error_type": dl.ERROR_TYPES.get(d["kind"], d["kind"]), "error_message": d.get("reason"),
        "reason": d.get("reason"), "delivered": d.get("delivered", 0), "first_seen": ts(d["at"]),
        "last_seen": ts(d["at"]), "details": {"key": d.get("key"), "dlq_seq": d.get("dlq_seq")},
    }
    row.update(_what_it_was(tx, row))
    return row


def _what_it_was(tx: ViewTransaction, row: dict[str, Any]) -> dict[str, Any]:
    """Best effort: which execution, step and workflow a message was about, if it says."""
    if row["payload_encoding"] != "utf-8":
        return {}
    try:
        body = orjson.loads(row["payload"])
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(body, dict):
        return {}
    subject = row["source_subject"] or ""
    out: dict[str, Any] = {}
    if subject.startswith((RESULTS_PREFIX + ".", STEPS_PREFIX + ".")):
        for key in ("execution_id", "step_id", "item", "attempt"):
            value = body.get(key)
            if key in ("item", "attempt"):  # garbage may say anything: only what fits the column
                value = value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**31 else None
            elif not isinstance(value, str):
                value = None
            out[key] = value
        if isinstance(body.get("workflow"), str) and body["workflow"]:
            out["workflow"] = body["workflow"]
    elif subject.startswith(TRIGGERS_PREFIX + "."):
        details = dict(row["details"])
        for key in ("id", "source", "type"):
            if isinstance(body.get(key), str):
                details[f"event_{key}"] = body[key]
        out["details"] = details
    if out.get("execution_id") and not out.get("workflow"):
        out["workflow"] = _workflow_of(tx, out["execution_id"])
    return out


def _workflow_of(tx: ViewTransaction, execution_id: str) -> str | None:
    try:
        uuid.UUID(execution_id)
    except ValueError:
        return None
    first = tx.read_stream(execution_id, upto_version=1)
    if first and first[0][3] == "ExecutionStarted":
        return orjson.loads(first[0][4]).get("workflow")
    return None


def _db(column: str, value: Any) -> Any:
    if column in JSON_COLUMNS:
        return orjson.dumps(value or {}).decode()
    return value
