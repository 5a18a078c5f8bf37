"""The step-runs view: one row per attempt of every step (and map item).

Status of an attempt: scheduled, succeeded, failed, dead_lettered, ignored (its
result came after the execution finished, or for a stale attempt), or reused
(attempt 0: a replay kept the output recorded by the execution it replays).
Duration is the worker's own (started_at to finished_at of the attempt).

Each event gives a partial row; a later event's non-null fields win. Rows of
one batch are merged in Python by the same rule the SQL upsert applies against
rows of earlier batches, so the result never depends on the batch boundaries.
"""

from __future__ import annotations

from typing import Any, Sequence

from services.projections.tables import (
    NO_ITEM, Ev, TableSpec, TableView, item_out, millis, norm_time, write_rows,
)
from services.store import ViewTransaction

_COLUMNS = (
    ("execution_id", "TEXT NOT NULL"), ("step_id", "TEXT NOT NULL"), ("item", "INTEGER NOT NULL"),
    ("attempt", "INTEGER NOT NULL"), ("status", "TEXT NOT NULL"), ("step_type", "TEXT"), ("reason", "TEXT"),
    ("scheduled_at", "TEXT"), ("not_before", "TEXT"), ("started_at", "TEXT"), ("finished_at", "TEXT"),
    ("duration_ms", "DOUBLE PRECISION"), ("worker_id", "TEXT"), ("error_type", "TEXT"), ("error_message", "TEXT"),
    ("dead_letter_reason", "TEXT"), ("ignored_reason", "TEXT"), ("reused_from", "TEXT"), ("position", "BIGINT"),
)
_NAMES = tuple(c for c, _ in _COLUMNS)
_KEY = ("execution_id", "step_id", "item", "attempt")
_DATA = tuple(c for c in _NAMES if c not in _KEY and c not in ("status", "ignored_reason"))


def _update(table: str) -> str:
    # 'ignored' only overrides an attempt still waiting for its result.
    keep = f"excluded.status = 'ignored' AND {table}.status <> 'scheduled'"
    sets = [f"{c} = COALESCE(excluded.{c}, {table}.{c})" for c in _DATA]
    sets.append(f"status = CASE WHEN {keep} THEN {table}.status ELSE excluded.status END")
    sets.append(f"ignored_reason = CASE WHEN {keep} THEN {table}.ignored_reason "
                f"ELSE COALESCE(excluded.ignored_reason, {table}.ignored_reason) END")
    return ", ".join(sets)


class StepRunsView(TableView):
    name = "view:step_runs"
    cost = 3  # relative database work per event: spreads views over lanes
    version = 1
    types = ("StepScheduled", "StepSucceeded", "StepFailed", "StepDeadLettered", "StepResultIgnored")
    tables = {"step_runs": TableSpec(_COLUMNS, _KEY, fillfactor=70)}

    @property
    def table(self) -> str:
        return self.t["step_runs"]

    def apply_events(self, tx: ViewTransaction, events: Sequence[Ev]) -> None:
        # Written out per event type (not through a generic merge): this loop sees most events.
        rows: dict[tuple[str, str, int, int], list[Any]] = {}
        for rec in events:
            kind, e = rec.type, rec.data
            attempt = e["attempt"]
            if attempt == 0 and kind != "StepDeadLettered" and not (kind == "StepSucceeded" and e.get("reused_from")):
                continue  # a map step's gathered output: not an attempt
            item = e.get("item")
            key = (rec.stream, e["step_id"], _NO_ITEM if item is None else item, attempt)
            row = rows.get(key)
            if row is None:
                row = rows[key] = [None] * _WIDTH
            elif kind == "StepResultIgnored" and row[_STATUS] != "scheduled":
                continue  # 'ignored' only overrides an attempt still waiting for its result
            if kind == "StepScheduled":
                row[_STATUS], row[_TYPE], row[_REASON], row[_SCHEDULED_AT] = "scheduled", e.get("step_type"), \
                    e.get("reason"), rec.at
                if e.get("not_before"):
                    row[_NOT_BEFORE] = norm_time(e["not_before"])
                row[_POSITION] = rec.position  # where the attempt's row begins: lists keep schedule order
            elif attempt == 0:
                row[_POSITION] = rec.position
                if kind == "StepSucceeded":
                    row[_STATUS], row[_REUSED_FROM], row[_FINISHED] = "reused", e["reused_from"], rec.at
                else:  # dead-lettered before any attempt ran (its input could not be built)
                    row[_STATUS], row[_ERROR_TYPE], row[_ERROR], row[_DL_REASON] = "dead_lettered", \
                        e["error_type"], e["error_message"], e["reason"]
            elif kind == "StepSucceeded" or kind == "StepFailed":
                row[_STATUS] = "succeeded" if kind == "StepSucceeded" else "failed"
                if e.get("worker_id") is not None:
                    row[_WORKER] = e["worker_id"]
                started, finished = e.get("started_at"), e.get("finished_at")
                if started and finished:
                    row[_STARTED], row[_FINISHED] = norm_time(started), norm_time(finished)
                    row[_DURATION] = millis(row[_STARTED], row[_FINISHED])
                if kind == "StepFailed":
                    row[_ERROR_TYPE], row[_ERROR] = e["error_type"], e["error_message"]
            elif kind == "StepDeadLettered":
                row[_STATUS], row[_ERROR_TYPE], row[_ERROR], row[_DL_REASON] = "dead_lettered", e["error_type"], \
                    e["error_message"], e["reason"]
            elif kind == "StepResultIgnored":
                row[_STATUS], row[_IGNORED] = "ignored", f"{e['outcome']} result ignored: {e['reason']}"
        out = [(*key, *row) for key, row in rows.items()]
        write_rows(tx, self.table, self.tables["step_runs"], out, update=_update(self.table))


_NO_ITEM = NO_ITEM
_DATA_COLUMNS = _NAMES[4:]
_WIDTH = len(_DATA_COLUMNS)
(_STATUS, _TYPE, _REASON, _SCHEDULED_AT, _NOT_BEFORE, _STARTED, _FINISHED, _DURATION, _WORKER, _ERROR_TYPE, _ERROR,
 _DL_REASON, _IGNORED, _REUSED_FROM, _POSITION) = (_DATA_COLUMNS.index(c) for c in (
    "status", "step_type", "reason", "scheduled_at", "not_before", "started_at", "finished_at", "duration_ms",
    "worker_id", "error_type", "error_message", "dead_letter_reason", "ignored_reason", "reused_from", "position"))


def step_runs(
    tx: ViewTransaction, execution_id: str, *, step_id: str | None = None, table: str = "weft_step_runs"
) -> list[dict[str, Any]]:
    """Every attempt of an execution's steps, in schedule order."""
    sql = f"SELECT {', '.join(_NAMES)} FROM {table} WHERE execution_id = ?"
    params: list[Any] = [execution_id]
    if step_id is not None:
        sql += " AND step_id = ?"
        params.append(step_id)
    tx.execute(sql + " ORDER BY position, step_id, item, attempt", params)
    out = []
    for row in tx.fetchall():
        r = dict(zip(_NAMES, row))
        r["item"] = item_out(r["item"])
        r["id"] = f"{r['execution_id']}:{r['step_id']}" + (f"#{r['item']}" if r["item"] is not None else "") + \
            f":{r['attempt']}"
        out.append(r)
    return out
