"""The executions view: one row per execution, for listing, filtering and lineage.

Row: status, workflow and version, input, output, error, timings, the status
of every step and the steps running now, `replay_of` and `replays` (the
executions started as replays of this one). Built only from the events, so a
rebuild from position 0 gives the same rows whatever the batch boundaries.
"""

from __future__ import annotations

from typing import Any, Sequence

from services.projections.tables import (
    Ev, TableSpec, TableView, dumps, loads, millis, norm_time, select_in, write_rows,
)
from services.projections.timeline import EXECUTION_EVENTS
from services.store import ViewTransaction

_FINISH = {"ExecutionCompleted": "completed", "ExecutionFailed": "failed", "ExecutionCancelled": "cancelled"}
_COLUMNS = (
    ("id", "TEXT NOT NULL"), ("workflow", "TEXT NOT NULL"), ("version", "INTEGER NOT NULL"),
    ("status", "TEXT NOT NULL"), ("started_at", "TEXT NOT NULL"), ("finished_at", "TEXT"),
    ("updated_at", "TEXT NOT NULL"), ("duration_ms", "DOUBLE PRECISION"), ("input", "TEXT"), ("output", "TEXT"),
    ("error", "TEXT"), ("error_type", "TEXT"), ("error_step", "TEXT"), ("steps", "TEXT NOT NULL"),
    ("current_steps", "TEXT NOT NULL"), ("replay_of", "TEXT"), ("replays", "TEXT NOT NULL"),
    ("trigger", "TEXT"), ("events", "INTEGER NOT NULL"), ("position", "BIGINT NOT NULL"),
)
_NAMES = tuple(c for c, _ in _COLUMNS)
_UPDATE = ", ".join(f"{c} = excluded.{c}" for c in _NAMES if c != "id")


class ExecutionsView(TableView):
    name = "view:executions"
    cost = 2  # relative database work per event: spreads views over lanes
    version = 2
    types = EXECUTION_EVENTS  # all of them: `events`, `updated_at` and `position` count every event
    tables = {
        "executions": TableSpec(
            _COLUMNS, ("id",),
            indexes=(("wf", ("workflow", "started_at")), ("status", ("status", "started_at")),
                     ("started", ("started_at",)), ("replay_of", ("replay_of",))),
            fillfactor=70,
        )
    }

    @property
    def table(self) -> str:
        return self.t["executions"]

    def apply_events(self, tx: ViewTransaction, events: Sequence[Ev]) -> None:
        started: set[str] = set()  # executions this batch starts
        missing: set[str] = set()  # rows to read: started before this batch
        for rec in events:
            eid, e = rec.stream, rec.data
            if rec.type == "ExecutionStarted":
                started.add(eid)
                source = e.get("replay_of")
                if source and source not in started:
                    missing.add(source)
            elif eid not in started:
                missing.add(eid)
        rows: dict[str, dict[str, Any]] = {}
        if missing:
            for row in select_in(tx, f"SELECT {', '.join(_NAMES)} FROM {self.table}", "id", missing):
                r = dict(zip(_NAMES, row))
                r["steps"], r["replays"] = loads(r["steps"]), loads(r["replays"])
                rows[r["id"]] = r
        touched: dict[str, dict[str, Any]] = {}
        for rec in events:
            eid, e = rec.stream, rec.data
            if rec.type == "ExecutionStarted":
                row = _started(eid, e, rec)
                if eid in rows:  # already there (a rebuild racing nothing, or a replayed append): keep lineage
                    row["replays"] = rows[eid]["replays"]
                rows[eid] = touched[eid] = row
                source = rows.get(e.get("replay_of") or "")
                if source is not None and eid not in source["replays"]:
                    source["replays"].append(eid)
                    touched[source["id"]] = source
                continue
            row = rows.get(eid)
            if row is None:
                continue  # events of an execution whose start this view never saw (not a valid history)
            _evolve(row, rec.type, e, rec.at)
            row["updated_at"] = rec.at
            row["events"], row["position"] = max(row["events"], rec.version), rec.position
            touched[eid] = row
        write_rows(tx, self.table, self.tables["executions"], [_out(row) for row in touched.values()], update=_UPDATE)


def _out(row: dict[str, Any]) -> tuple[Any, ...]:
    finished = row["status"] in ("completed", "failed", "cancelled")
    current = [] if finished else [s for s, st in row["steps"].items() if st == "scheduled"]
    r = row | {"steps": dumps(row["steps"]), "replays": dumps(row["replays"]), "current_steps": dumps(current)}
    return tuple(r[c] for c in _NAMES)


def _started(eid: str, e: dict[str, Any], rec: Ev) -> dict[str, Any]:
    at = rec.at
    steps = {s["id"]: "pending" for s in e["definition"].get("steps", ())}
    trigger = e.get("trigger")
    return {
        "id": eid, "workflow": e["workflow"], "version": e["version"], "status": "running", "started_at": at,
        "finished_at": None, "updated_at": at, "duration_ms": None, "input": dumps(e.get("input")), "output": None,
        "error": None, "error_type": None, "error_step": None, "steps": steps, "replay_of": e.get("replay_of"),
        "replays": [], "trigger": dumps(trigger) if trigger is not None else None, "events": rec.version,
        "position": rec.position,
    }


def _evolve(row: dict[str, Any], kind: str, e: dict[str, Any], at: str) -> None:
    """Mirror of the core's evolve, for what this row shows (status, step statuses, result)."""
    steps = row["steps"]
    step = e.get("step_id")
    if kind == "StepScheduled":  # the common cases first: this runs for nearly every event
        if steps.get(step) in ("pending", "dead_lettered"):
            steps[step] = "scheduled"
    elif kind == "StepSucceeded":
        if e.get("item") is None:
            steps[step] = "succeeded"
    elif kind in ("StepFailed", "StepResultIgnored"):
        return  # no step or execution status changes with these
    elif kind == "StepMapped":
        steps[step] = "scheduled"
    elif kind == "StepDeadLettered":
        steps[step] = "dead_lettered"
    elif kind == "StepSkipped":
        steps[step] = "skipped"
    elif kind == "StepReprocessRequested":
        steps[step] = "pending"  # its new StepScheduled follows in the same append
        _reopen(row)
    elif kind == "ExecutionRetried":
        for sid, status in steps.items():
            if status == "dead_lettered":
                steps[sid] = "pending"
        _reopen(row)
    elif kind in _FINISH:
        row["status"] = _FINISH[kind]
        row["finished_at"] = at
        row["duration_ms"] = millis(row["started_at"], row["finished_at"])
        if kind == "ExecutionCompleted":
            row["output"] = dumps(e.get("output"))
        elif kind == "ExecutionFailed":
            row["error"], row["error_type"], row["error_step"] = e["error_message"], e["error_type"], e.get("step_id")
    elif kind == "ExecutionPaused":
        row["status"] = "paused"
    elif kind == "ExecutionResumed":
        row["status"] = "running"


def _reopen(row: dict[str, Any]) -> None:
    row.update(status="running", finished_at=None, duration_ms=None, output=None, error=None, error_type=None,
               error_step=None)


# ---- reading ---------------------------------------------------------------------------------

_LIST = ("id", "workflow", "version", "status", "started_at", "finished_at", "duration_ms", "replay_of", "replays",
         "error", "current_steps", "updated_at")


def list_executions(
    tx: ViewTransaction, *, workflow: str | None = None, status: str | None = None, limit: int = 100,
    offset: int = 0, since: str | None = None, until: str | None = None, replay_of: str | None = None,
    version: int | None = None, oldest_first: bool = False, after: tuple[str, str] | None = None,
    table: str = "weft_executions", workflows: Sequence[str] | None = None, id_prefix: str | None = None,
) -> list[dict[str, Any]]:
    """Executions from the view, newest first (or oldest first), filtered.

    `since`/`until` bound `started_at` (ISO times, until exclusive); `after` is a
    keyset cursor (started_at, id) for paging oldest first through large results.
    """
    where, params = [], []
    for column, value in (("workflow", workflow), ("status", status), ("replay_of", replay_of), ("version", version)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if id_prefix:  # hex digits and dashes only (the caller checks): nothing for LIKE to interpret
        where.append("id LIKE ?")
        params.append(id_prefix.lower() + "%")
    if since:
        where.append("started_at >= ?")
        params.append(norm_time(since))
    if until:
        where.append("started_at < ?")
        params.append(norm_time(until))
    if workflows is not None:  # only these (an API key bound to some workflows)
        if not workflows:
            return []
        where.append(f"workflow IN ({', '.join('?' * len(workflows))})")
        params.extend(workflows)
    if after is not None:
        op = ">" if oldest_first else "<"  # the cursor follows the order, either way
        where.append(f"(started_at {op} ? OR (started_at = ? AND id {op} ?))")
        params.extend([after[0], after[0], after[1]])
    sql = f"SELECT {', '.join(_LIST)} FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    order = "ASC" if oldest_first else "DESC"
    sql += f" ORDER BY started_at {order}, id {order} LIMIT ? OFFSET ?"
    tx.execute(sql, (*params, limit, offset))
    out = []
    for row in tx.fetchall():
        r = dict(zip(_LIST, row))
        r["replays"], r["current_steps"] = loads(r["replays"]), loads(r["current_steps"])
        r["execution_id"] = r["id"]
        out.append(r)
    return out


def get_execution(tx: ViewTransaction, execution_id: str, *, table: str = "weft_executions") -> dict[str, Any] | None:
    """One execution's row with everything in it (input, output, step statuses), or None."""
    tx.execute(f"SELECT {', '.join(_NAMES)} FROM {table} WHERE id = ?", (execution_id,))
    row = tx.fetchone()
    if row is None:
        return None
    r = dict(zip(_NAMES, row))
    for c in ("input", "output", "steps", "current_steps", "replays", "trigger"):
        r[c] = loads(r[c])
    r["execution_id"] = r["id"]
    return r


def lineage(tx: ViewTransaction, execution_id: str, *, table: str = "weft_executions") -> dict[str, Any]:
    """What an execution is a replay of, and its replays (oldest first)."""
    tx.execute(f"SELECT replay_of, replays FROM {table} WHERE id = ?", (execution_id,))
    row = tx.fetchone()
    if row is None:
        return {"replay_of": None, "replays": []}
    return {"replay_of": row[0], "replays": loads(row[1])}
