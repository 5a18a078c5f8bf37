"""The executions view: one row per execution, for listing and filtering."""

from __future__ import annotations

from typing import Any, Sequence

import orjson

from services.store import StoredRecord, ViewTransaction

_STATUS = {
    "ExecutionCompleted": "completed",
    "ExecutionFailed": "failed",
    "ExecutionCancelled": "cancelled",
    "ExecutionPaused": "paused",
    "ExecutionResumed": "running",
    "ExecutionRetried": "running",
    "StepReprocessRequested": "running",
}


class ExecutionsView:
    name = "view:executions"
    types = ("ExecutionStarted", *_STATUS)
    table = "weft_executions"

    def create(self, tx: ViewTransaction) -> None:
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            "id TEXT PRIMARY KEY, workflow TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL, "
            "started_at TEXT NOT NULL, finished_at TEXT, updated_at TEXT NOT NULL, replay_of TEXT, "
            "error TEXT, position BIGINT NOT NULL)"
        )
        tx.execute(f"CREATE INDEX IF NOT EXISTS {self.table}_wf ON {self.table} (workflow, started_at)")
        tx.execute(f"CREATE INDEX IF NOT EXISTS {self.table}_status ON {self.table} (status, started_at)")

    def apply(self, tx: ViewTransaction, records: Sequence[StoredRecord]) -> None:
        for rec in records:
            e = orjson.loads(rec.data)
            eid = str(rec.stream_id)
            if rec.type == "ExecutionStarted":
                tx.execute(
                    f"INSERT INTO {self.table} (id, workflow, version, status, started_at, updated_at, replay_of, position) "
                    "VALUES (?, ?, ?, 'running', ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    (eid, e["workflow"], e["version"], e["at"], e["at"], e.get("replay_of"), rec.position),
                )
                continue
            status = _STATUS[rec.type]
            finished = e["at"] if status in ("completed", "failed", "cancelled") else None
            error = e.get("error_message") if rec.type == "ExecutionFailed" else None
            tx.execute(
                f"UPDATE {self.table} SET status = ?, finished_at = ?, updated_at = ?, error = ?, position = ? "
                "WHERE id = ?",
                (status, finished, e["at"], error, rec.position, eid),
            )


def list_executions(
    tx: ViewTransaction, *, workflow: str | None = None, status: str | None = None, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    where, params = [], []
    if workflow:
        where.append("workflow = ?")
        params.append(workflow)
    if status:
        where.append("status = ?")
        params.append(status)
    sql = "SELECT id, workflow, version, status, started_at, finished_at, replay_of, error FROM weft_executions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY started_at DESC, id LIMIT ? OFFSET ?"
    tx.execute(sql, (*params, limit, offset))
    cols = ("id", "workflow", "version", "status", "started_at", "finished_at", "replay_of", "error")
    return [dict(zip(cols, row), execution_id=row[0]) for row in tx.fetchall()]
