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
    Ev, TableSpec, TableView, item_of, item_out, millis, norm_time, write_rows,
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
    version = 1
    types = ("StepScheduled", "StepSucceeded", "StepFailed", "StepDeadLettered", "StepResultIgnored")
    tables = {"step_runs": TableSpec(_COLUMNS, _KEY, indexes=(("status", ("status", "scheduled_at")),))}

    @property
    def table(self) -> str:
        return self.t["step_runs"]

    def apply_events(self, tx: ViewTransaction, events: Sequence[Ev]) -> None:
        rows: dict[tuple[str, str, int, int], dict[str, Any]] = {}
        for rec in events:
            e = rec.data
            part = _partial(rec.type, e, rec.at)
            if part is None:
                continue
            key = (rec.stream, e["step_id"], item_of(e.get("item")), e["attempt"])
            if rec.type == "StepScheduled" or e["attempt"] == 0:
                part["position"] = rec.position  # where the attempt's row begins: lists keep schedule order
            row = rows.get(key)
            if row is None:
                rows[key] = part
                continue
            if part["status"] == "ignored" and row["status"] != "scheduled":
                continue
            for c, v in part.items():
                if v is not None:
                    row[c] = v
        out = [(*key, *(row.get(c) for c in _NAMES[4:])) for key, row in rows.items()]
        write_rows(tx, self.table, self.tables["step_runs"], out, update=_update(self.table))


def _partial(kind: str, e: dict[str, Any], at: str) -> dict[str, Any] | None:
    if kind == "StepScheduled":
        return {"status": "scheduled", "step_type": e.get("step_type"), "reason": e.get("reason"),
                "scheduled_at": at, "not_before": norm_time(e.get("not_before"))}
    if kind in ("StepSucceeded", "StepFailed"):
        if e["attempt"] == 0:
            if kind == "StepSucceeded" and e.get("reused_from"):
                return {"status": "reused", "reused_from": e["reused_from"], "finished_at": at}
            return None  # a map step's gathered output: not an attempt
        started, finished = norm_time(e.get("started_at")), norm_time(e.get("finished_at"))
        part = {"status": "succeeded" if kind == "StepSucceeded" else "failed", "worker_id": e.get("worker_id"),
                "started_at": started, "finished_at": finished, "duration_ms": millis(started, finished)}
        if kind == "StepFailed":
            part["error_type"], part["error_message"] = e["error_type"], e["error_message"]
        return part
    if kind == "StepDeadLettered":
        return {"status": "dead_lettered", "error_type": e["error_type"], "error_message": e["error_message"],
                "dead_letter_reason": e["reason"]}
    if kind == "StepResultIgnored":
        return {"status": "ignored", "ignored_reason": f"{e['outcome']} result ignored: {e['reason']}"}
    return None


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
