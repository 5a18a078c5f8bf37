"""Per-workflow statistics: executions by status, p50/p95 duration, failure rate.

Two tables: `workflow_stats` holds the counters (moved by each status change),
and `stats_executions` each execution's current status and, once completed,
its duration, indexed so that percentiles are two index lookups at read time
(exact, not estimated). Failure rate: failed / (completed + failed).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from services.projections.tables import Ev, TableSpec, TableView, millis, select_in, write_rows
from services.store import ViewTransaction

STATUSES = ("running", "paused", "completed", "failed", "cancelled")
_STATUS = {
    "ExecutionCompleted": "completed", "ExecutionFailed": "failed", "ExecutionCancelled": "cancelled",
    "ExecutionPaused": "paused", "ExecutionResumed": "running", "ExecutionRetried": "running",
    "StepReprocessRequested": "running",
}
_EXEC_COLUMNS = (
    ("id", "TEXT NOT NULL"), ("workflow", "TEXT NOT NULL"), ("status", "TEXT NOT NULL"),
    ("started_at", "TEXT NOT NULL"), ("duration_ms", "DOUBLE PRECISION"),
)
_STATS_COLUMNS = (("workflow", "TEXT NOT NULL"), ("total", "BIGINT NOT NULL"),
                  *((s, "BIGINT NOT NULL") for s in STATUSES), ("updated_at", "TEXT"))
_EXEC_NAMES = tuple(c for c, _ in _EXEC_COLUMNS)
_STATS_NAMES = tuple(c for c, _ in _STATS_COLUMNS)


class WorkflowStatsView(TableView):
    name = "view:workflow_stats"
    cost = 1  # relative database work per event: spreads views over lanes
    version = 1
    types = ("ExecutionStarted", *_STATUS)
    tables = {
        "workflow_stats": TableSpec(_STATS_COLUMNS, ("workflow",)),
        "stats_executions": TableSpec(_EXEC_COLUMNS, ("id",), indexes=(("dur", ("workflow", "duration_ms")),),
                                      fillfactor=80),
    }

    def apply_events(self, tx: ViewTransaction, events: Sequence[Ev]) -> None:
        started, missing = set(), set()
        for rec in events:
            eid = rec.stream
            if rec.type == "ExecutionStarted":
                started.add(eid)
            elif eid not in started:
                missing.add(eid)
        before: dict[str, tuple[str, str] | None] = {}  # id -> (workflow, status) before this batch
        rows: dict[str, dict[str, Any]] = {}
        if missing:
            table = self.t["stats_executions"]
            for row in select_in(tx, f"SELECT {', '.join(_EXEC_NAMES)} FROM {table}", "id", missing):
                r = dict(zip(_EXEC_NAMES, row))
                rows[r["id"]] = r
                before[r["id"]] = (r["workflow"], r["status"])
        touched: dict[str, dict[str, Any]] = {}
        latest: dict[str, str] = {}
        for rec in events:
            kind, eid, e = rec.type, rec.stream, rec.data
            at = rec.at
            if kind == "ExecutionStarted":
                if eid in rows:
                    continue  # started twice in the log is not a valid history; count it once
                before.setdefault(eid, None)
                rows[eid] = {"id": eid, "workflow": e["workflow"], "status": "running", "started_at": at,
                             "duration_ms": None}
            else:
                row = rows.get(eid)
                if row is None:
                    continue
                row["status"] = _STATUS[kind]
                row["duration_ms"] = millis(row["started_at"], at) if kind == "ExecutionCompleted" else None
            touched[eid] = rows[eid]
            wf = rows[eid]["workflow"]
            latest[wf] = max(latest.get(wf, at), at)
        deltas: dict[str, dict[str, int]] = {}
        for eid, row in touched.items():
            d = deltas.setdefault(row["workflow"], dict.fromkeys(("total", *STATUSES), 0))
            prior = before.get(eid)
            if prior is None:
                d["total"] += 1
            else:
                d[prior[1]] -= 1
            d[row["status"]] += 1
        write_rows(tx, self.t["stats_executions"], self.tables["stats_executions"],
                   [tuple(r[c] for c in _EXEC_NAMES) for r in touched.values()],
                   update=", ".join(f"{c} = excluded.{c}" for c in _EXEC_NAMES[1:]))
        stats = self.t["workflow_stats"]
        counters = ("total", *STATUSES)
        update = ", ".join(f"{c} = {stats}.{c} + excluded.{c}" for c in counters)
        update += f", updated_at = CASE WHEN excluded.updated_at > {stats}.updated_at OR {stats}.updated_at IS NULL " \
                  f"THEN excluded.updated_at ELSE {stats}.updated_at END"
        write_rows(tx, stats, self.tables["workflow_stats"],
                   [(wf, *(d[c] for c in counters), latest.get(wf)) for wf, d in sorted(deltas.items())],
                   update=update)


def workflow_stats(
    tx: ViewTransaction, workflow: str | None = None, *, prefix: str = "weft_"
) -> list[dict[str, Any]]:
    """Counts by status, p50/p95 duration (ms, completed executions) and failure rate, per workflow."""
    stats, execs = f"{prefix}workflow_stats", f"{prefix}stats_executions"
    sql = f"SELECT {', '.join(_STATS_NAMES)} FROM {stats}"
    params: tuple[Any, ...] = ()
    if workflow is not None:
        sql += " WHERE workflow = ?"
        params = (workflow,)
    tx.execute(sql + " ORDER BY workflow", params)
    out = []
    for row in tx.fetchall():
        r = dict(zip(_STATS_NAMES, row))
        done = r["completed"] + r["failed"]
        r["failure_rate"] = round(r["failed"] / done, 4) if done else None
        r["id"] = r["workflow"]
        out.append(r)
    for r in out:
        n = r["completed"]
        for name, p in (("p50_ms", 0.5), ("p95_ms", 0.95)):
            r[name] = None
            if n:
                tx.execute(
                    f"SELECT duration_ms FROM {execs} WHERE workflow = ? AND duration_ms IS NOT NULL "
                    "ORDER BY duration_ms LIMIT 1 OFFSET ?",
                    (r["workflow"], max(math.ceil(p * n) - 1, 0)),  # nearest rank
                )
                got = tx.fetchone()
                r[name] = got[0] if got else None
    return out
