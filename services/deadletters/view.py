"""Reading the dead-letter view (services.projections.deadletters builds it): filters,
list, find by id or prefix, counts, clusters by error, and `refresh` / `FreshView` to
bring it up to date before a read.
"""


from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from contracts import deadletters as dl
from services.projections import Projector, catch_up
from services.projections.deadletters import COLUMNS, JSON_COLUMNS, TABLE, DeadLettersView, ts
from services.store import EventStore, ViewTransaction

__all__ = ["COLUMNS", "TABLE", "DeadLettersView", "Filters", "FreshView", "find", "group_by_error", "kind_problem", "kinds", "list_dead_letters",
           "open_counts", "refresh", "seq_before", "stats", "status_counts", "ts", "user_frames"]


def refresh(store: EventStore, *, limit: int | None = 200_000) -> None:
    """Set the view up and bring it up to date (bounded), before a command or a request
    reads it, so a list right after a failure shows it. A running projector or dead-letter
    service may be following it too."""
    catch_up(store, [DeadLettersView()], limit=limit)


class FreshView:
    """The view for a process that reads it again and again (the gateway, `weft dlq watch`):
    set up once, then caught up before each read, one catch-up at a time (a projector is
    not shared between threads), so a read costs a look at the log, not a new projector."""

    def __init__(self, store: EventStore):
        self.projector = Projector(store, [DeadLettersView()], lanes=1)
        self._lock = threading.Lock()

    def refresh(self, *, limit: int | None = 200_000) -> None:
        with self._lock:
            self.projector.catch_up(limit=limit)

    def close(self) -> None:
        self.projector.close()

    def __enter__(self) -> FreshView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    workflow: str | None = None
    step: str | None = None
    kind: str | None = None  # a kind, or "step" / "message" for every kind of that source
    status: str | None = None  # None: any
    since: str | None = None  # ts(); compared with last_seen
    until: str | None = None
    error_contains: str | None = None
    execution_id: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("workflow", self.workflow), ("step_id", self.step), ("status", self.status),
                              ("execution_id", self.execution_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.kind in ("step", "message"):
            clauses.append("source = ?")
            params.append(self.kind)
        elif self.kind is not None:
            clauses.append("kind = ?")
            params.append(self.kind)
        if self.since is not None:
            clauses.append("last_seen >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("last_seen < ?")
            params.append(self.until)
        if self.error_contains:
            needle = "%" + re.sub(r"([\\%_])", r"\\\1", self.error_contains.lower()) + "%"
            clauses.append(
                "(LOWER(COALESCE(error_message, '')) LIKE ? ESCAPE '\\' OR LOWER(COALESCE(error_type, '')) LIKE ? ESCAPE '\\')"
            )
            params += [needle, needle]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _row(values: Sequence[Any]) -> dict[str, Any]:
    row = dict(zip(COLUMNS, values))
    for column in JSON_COLUMNS:
        row[column] = orjson.loads(row[column]) if row[column] else {}
    return row


def list_dead_letters(
    tx: ViewTransaction, filters: Filters = Filters(), *, limit: int | None = 100, offset: int = 0,
    after_seq: int | None = None, oldest_first: bool = False,
) -> list[dict[str, Any]]:
    """Newest first (or oldest); `limit` None: every match."""
    where, params = filters.where()
    if after_seq is not None:
        where += (" AND " if where else " WHERE ") + "seq > ?"
        params.append(after_seq)
    order = "seq ASC" if oldest_first else "seq DESC"
    page = "" if limit is None else " LIMIT ? OFFSET ?"
    tx.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE}{where} ORDER BY {order}{page}",
               params if limit is None else (*params, limit, offset))
    return [_row(r) for r in tx.fetchall()]


def find(tx: ViewTransaction, ref: str) -> list[dict[str, Any]]:
    """Dead letters whose id is `ref`, or starts with it (a short id, as the table shows)."""
    ref = ref.strip().lower()
    tx.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE id = ?", (ref,))
    rows = tx.fetchall()
    if not rows and re.fullmatch(r"[0-9a-f-]{4,36}", ref):
        tx.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE id LIKE ? ORDER BY seq LIMIT 5", (ref + "%",))
        rows = tx.fetchall()
    return [_row(r) for r in rows]


def kinds(tx: ViewTransaction) -> set[str]:
    """Every kind a filter may name: the contract's, the view's own, and "step" / "message"."""
    tx.execute(f"SELECT DISTINCT kind FROM {TABLE}")
    return {r[0] for r in tx.fetchall()} | set(dl.STEP_KINDS) | set(dl.MESSAGE_KINDS) | {"step", "message"}


def kind_problem(tx: ViewTransaction, kind: str | None) -> str | None:
    """Why `kind` cannot filter the view (None if it can), listing the known kinds."""
    if kind is None:
        return None
    known = kinds(tx)
    return None if kind in known else f"unknown kind {kind!r}; known: {', '.join(sorted(known))}"


def seq_before(tx: ViewTransaction, since: str | None = None) -> int:
    """Where following new rows starts (rows with a larger `seq` are new): after the newest
    row, or with `since` (a ts()), just before the first row seen since then."""
    if since is None:
        tx.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {TABLE}")
    else:
        tx.execute(f"SELECT COALESCE(MIN(seq), 0) - 1 FROM {TABLE} WHERE last_seen >= ?", (since,))
    row = tx.fetchone()
    return int(row[0]) if row else 0


def open_counts(tx: ViewTransaction) -> list[tuple[str, str, int]]:
    """(kind, workflow, count) of open dead letters."""
    tx.execute(
        f"SELECT kind, COALESCE(workflow, ''), COUNT(*) FROM {TABLE} WHERE status = 'open' GROUP BY kind, COALESCE(workflow, '') "
        "ORDER BY kind, COALESCE(workflow, '')"
    )
    return [(k, w, int(n)) for k, w, n in tx.fetchall()]


def status_counts(tx: ViewTransaction, workflows: Sequence[str] | None = None) -> dict[str, int]:
    """Dead letters by status; with `workflows`, only theirs (a key bound to some workflows)."""
    if workflows is not None:
        names = sorted(workflows) or [""]
        tx.execute(f"SELECT status, COUNT(*) FROM {TABLE} WHERE workflow IN ({', '.join('?' * len(names))}) "
                   "GROUP BY status", names)
        return {s: int(n) for s, n in tx.fetchall()}
    tx.execute(f"SELECT status, COUNT(*) FROM {TABLE} GROUP BY status")
    return {s: int(n) for s, n in tx.fetchall()}


def stats(tx: ViewTransaction, workflows: Sequence[str] | None = None) -> dict[str, Any]:
    """What `weft dlq stats --json` and `GET /v1/deadletters/stats` answer: open dead letters by
    kind and workflow, and totals by status; with `workflows`, only theirs."""
    counts = [c for c in open_counts(tx) if workflows is None or c[1] in workflows]
    statuses = status_counts(tx, workflows)
    return {
        "open": [{"id": f"{k}/{w}", "kind": k, "workflow": w or None, "count": n} for k, w, n in counts],
        "by_status": {s: statuses.get(s, 0) for s in dl.STATUSES},
    }


_VOLATILE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I), "<id>"),
    (re.compile(r"0x[0-9a-f]+", re.I), "<hex>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"(?<![A-Za-z_])-?\d+(\.\d+)?"), "<n>"),
]


def error_signature(row: dict[str, Any]) -> str:
    """The shape of a failure: ids, numbers and quoted values masked, so one bug is one cluster."""
    message = (row.get("error_message") or "").splitlines()[0][:300] if row.get("error_message") else ""
    for pattern, mask in _VOLATILE:
        message = pattern.sub(mask, message)
    return message


def group_by_error(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["kind"], r.get("error_type") or "", error_signature(r))
        g = groups.get(key)
        if g is None:
            g = groups[key] = {
                "id": str(uuid.uuid5(uuid.NAMESPACE_OID, "\x00".join(key)))[:8], "count": 0, "kind": key[0],
                "error_type": key[1], "error": key[2], "workflows": set(), "steps": set(), "statuses": set(),
                "first_seen": r["first_seen"], "last_seen": r["last_seen"], "example": r["id"], "ids": [],
            }
        g["count"] += 1
        g["ids"].append(r["id"])
        if r.get("workflow"):
            g["workflows"].add(r["workflow"])
        if r.get("step_id"):
            g["steps"].add(r["step_id"])
        g["statuses"].add(r["status"])
        g["first_seen"] = min(g["first_seen"], r["first_seen"])
        g["last_seen"] = max(g["last_seen"], r["last_seen"])
    out = sorted(groups.values(), key=lambda g: (-g["count"], g["last_seen"]))
    for g in out:
        for k in ("workflows", "steps", "statuses"):
            g[k] = sorted(g[k])
    return out


def user_frames(traceback: str, hide: Sequence[str]) -> tuple[str, int]:
    """The traceback without the frames of files under `hide` (the worker, the standard library),
    so what is left is the step's own code; and how many frames were hidden. Unchanged if that
    would hide every frame."""
    kept: list[str] = []
    hidden = frames = 0
    skipping = False
    for line in traceback.rstrip().splitlines():
        if line.startswith('  File "'):
            frames += 1
            path = line[len('  File "'):].split('"', 1)[0]
            skipping = any(path.startswith(h) for h in hide)
            hidden += skipping
        elif not line.startswith("    "):
            skipping = False  # "Traceback ...", "The above exception ...", the exception itself
        if not skipping:
            kept.append(line)
    if hidden == frames:
        return traceback.rstrip(), 0
    return "\n".join(kept), hidden
