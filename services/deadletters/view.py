"""The dead-letter view: one row per dead letter, built from the notification log.

Step dead letters come straight from `StepDeadLettered` events (the execution's
history up to that event supplies the workflow, the attempt's input and the
traceback of its `StepFailed`); message dead letters from `DeadLetterRecorded`.
Acts (`DeadLetterReprocessed`, `DeadLetterDiscarded`, and a reprocess or retry
done straight on the execution) move the status. Rows and the view's tracked
position are written in one transaction, so each event is applied once, and
the view can be dropped and rebuilt from position 0 to the same rows.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from contracts import deadletters as dl
from contracts.subjects import RESULTS_PREFIX, STEPS_PREFIX, TRIGGERS_PREFIX, step_subject
from services.store import ConcurrencyError, EventStore, StoredRecord, ViewTransaction

TABLE = "weft_dead_letters"
COLUMNS = (
    "id", "seq", "source", "kind", "status", "workflow", "execution_id", "step_id", "item", "attempt",
    "source_subject", "payload", "payload_encoding", "headers", "error_type", "error_message", "traceback",
    "reason", "delivered", "first_seen", "last_seen", "actor", "action_reason", "acted_at", "details",
)
_JSON_COLUMNS = ("headers", "details")
STEP_TYPES = ("StepDeadLettered", "StepReprocessRequested", "ExecutionRetried")
TYPES = (*STEP_TYPES, *dl.EVENT_TYPES)
SKIP_AHEAD = 500  # unrelated events to pass over before recording the position past them


def ts(value: datetime | str) -> str:
    """One fixed text form for times, so they compare as strings in SQL on both backends."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class DeadLettersView:
    name = "view:dead_letters"
    types = TYPES
    table = TABLE

    def __init__(self, store: EventStore):
        self.store = store  # to read an execution's history when one of its steps is dead-lettered

    def create(self, tx: ViewTransaction) -> None:
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            "id TEXT PRIMARY KEY, seq BIGINT NOT NULL, source TEXT NOT NULL, kind TEXT NOT NULL, "
            "status TEXT NOT NULL, workflow TEXT, execution_id TEXT, step_id TEXT, item INTEGER, attempt INTEGER, "
            "source_subject TEXT, payload TEXT, payload_encoding TEXT NOT NULL, headers TEXT NOT NULL, "
            "error_type TEXT, error_message TEXT, traceback TEXT, reason TEXT, delivered INTEGER NOT NULL, "
            "first_seen TEXT NOT NULL, last_seen TEXT NOT NULL, actor TEXT, action_reason TEXT, acted_at TEXT, "
            "details TEXT NOT NULL, position BIGINT NOT NULL)"
        )
        tx.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_status ON {TABLE} (status, kind, workflow)")
        tx.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_execution ON {TABLE} (execution_id, step_id)")
        tx.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_seq ON {TABLE} (seq)")

    # ---- applying ---------------------------------------------------------------------------

    def prepare(self, records: Sequence[StoredRecord]) -> dict[int, dict[str, Any]]:
        """Read what the rows need from other streams, before the view's transaction opens."""
        out: dict[int, dict[str, Any]] = {}
        for rec in records:
            if rec.type == "StepDeadLettered":
                out[rec.position] = self._step_row(rec)
            elif rec.type == "DeadLetterRecorded":
                out[rec.position] = self._message_row(rec)
        return out

    def apply(self, tx: ViewTransaction, records: Sequence[StoredRecord], prepared: dict[int, dict[str, Any]] | None = None) -> None:
        prepared = prepared if prepared is not None else self.prepare(records)
        inserts: list[tuple[Any, ...]] = []
        for rec in records:
            if rec.position in prepared:
                row = prepared[rec.position]
                inserts.append((*(_db(c, row.get(c)) for c in COLUMNS), rec.position))
                continue
            self._insert(tx, inserts)  # rows first: a later act in this batch may update them
            e = orjson.loads(rec.data)
            at = ts(e["at"])
            if rec.type == "StepReprocessRequested":
                item_sql = "item IS NULL" if e.get("item") is None else "item = ?"
                params: tuple[Any, ...] = (e.get("by"), e.get("why"), at, rec.position, str(rec.stream_id), e["step_id"])
                if e.get("item") is not None:
                    params += (e["item"],)
                tx.execute(
                    f"UPDATE {TABLE} SET status = 'reprocessed', actor = ?, action_reason = ?, acted_at = ?, position = ? "
                    f"WHERE execution_id = ? AND source = 'step' AND status = 'open' AND step_id = ? AND {item_sql}",
                    params,
                )
            elif rec.type == "ExecutionRetried":
                tx.execute(
                    f"UPDATE {TABLE} SET status = 'reprocessed', actor = ?, action_reason = ?, acted_at = ?, position = ? "
                    "WHERE execution_id = ? AND source = 'step' AND status = 'open'",
                    (e.get("by"), e.get("why") or "execution retried", at, rec.position, str(rec.stream_id)),
                )
            elif rec.type == "DeadLetterSeen":
                tx.execute(
                    f"UPDATE {TABLE} SET last_seen = ?, delivered = CASE WHEN delivered > ? THEN delivered ELSE ? END, "
                    "position = ? WHERE id = ?",
                    (at, e.get("delivered", 0), e.get("delivered", 0), rec.position, e["dead_letter_id"]),
                )
            elif rec.type in ("DeadLetterReprocessed", "DeadLetterDiscarded"):
                status = dl.REPROCESSED if rec.type == "DeadLetterReprocessed" else dl.DISCARDED
                tx.execute(
                    f"UPDATE {TABLE} SET status = ?, actor = ?, action_reason = ?, acted_at = ?, position = ? WHERE id = ?",
                    (status, e.get("by"), e.get("why"), at, rec.position, e["dead_letter_id"]),
                )
        self._insert(tx, inserts)

    def _insert(self, tx: ViewTransaction, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            tx.executemany(
                f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}, position) VALUES ({', '.join('?' * (len(COLUMNS) + 1))}) "
                "ON CONFLICT (id) DO NOTHING",
                rows,
            )
            rows.clear()

    def _step_row(self, rec: StoredRecord) -> dict[str, Any]:
        e = orjson.loads(rec.data)
        execution_id = str(rec.stream_id)
        step_id, item, attempt = e["step_id"], e.get("item"), e.get("attempt", 0)
        workflow = None
        started: dict[str, Any] = {}
        scheduled: dict[str, Any] = {}
        failed: dict[str, Any] = {}
        attempts = 0
        # The history up to this event never changes, so a rebuild derives the same row.
        for r in self.store.load(rec.stream_id, upto_version=rec.version):
            if r.type not in ("ExecutionStarted", "StepScheduled", "StepFailed"):
                continue
            x = orjson.loads(r.data)
            if r.type == "ExecutionStarted":
                started, workflow = x, x.get("workflow")
            elif x.get("step_id") == step_id and x.get("item") == item:
                if r.type == "StepScheduled":
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
            "execution_version": rec.version,
            "idempotency_key": scheduled.get("idempotency_key"),
            "step_type": scheduled.get("step_type"),
            "config": scheduled.get("config"),
            "worker_id": failed.get("worker_id"),
            "attempts": attempts,
        }
        return {
            "id": dl.step_dead_letter_id(execution_id, rec.version), "seq": rec.position, "source": "step",
            "kind": dl.step_kind(e.get("reason", "")), "status": dl.OPEN, "workflow": workflow,
            "execution_id": execution_id, "step_id": step_id, "item": item, "attempt": attempt,
            "source_subject": step_subject(scheduled["step_type"]) if scheduled.get("step_type") else None,
            "payload": payload, "payload_encoding": "utf-8", "headers": {},
            "error_type": e.get("error_type"), "error_message": e.get("error_message"),
            "traceback": failed.get("traceback"), "reason": e.get("reason"), "delivered": attempts,
            "first_seen": ts(e["at"]), "last_seen": ts(e["at"]), "details": details,
        }

    def _message_row(self, rec: StoredRecord) -> dict[str, Any]:
        e = orjson.loads(rec.data)
        row: dict[str, Any] = {
            "id": e["dead_letter_id"], "seq": rec.position, "source": "message", "kind": e["kind"], "status": dl.OPEN,
            "source_subject": e.get("source_subject") or None, "payload": e["payload"],
            "payload_encoding": e.get("payload_encoding", "utf-8"), "headers": e.get("headers") or {},
            "error_type": dl.ERROR_TYPES.get(e["kind"], e["kind"]), "error_message": e.get("reason"),
            "reason": e.get("reason"), "delivered": e.get("delivered", 0), "first_seen": ts(e["at"]),
            "last_seen": ts(e["at"]), "details": {"key": e.get("key"), "dlq_seq": e.get("dlq_seq")},
        }
        row.update(self._what_it_was(row))
        return row

    def _what_it_was(self, row: dict[str, Any]) -> dict[str, Any]:
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
                if key in ("item", "attempt"):
                    value = value if isinstance(value, int) and not isinstance(value, bool) else None
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
            out["workflow"] = self._workflow_of(out["execution_id"])
        return out

    def _workflow_of(self, execution_id: str) -> str | None:
        try:
            sid = uuid.UUID(execution_id)
        except ValueError:
            return None
        first = self.store.load(sid, upto_version=1)
        if first and first[0].type == "ExecutionStarted":
            return orjson.loads(first[0].data).get("workflow")
        return None


def _db(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS:
        return orjson.dumps(value or {}).decode()
    return value


def catch_up(store: EventStore, view: DeadLettersView, *, batch: int = 500, rounds: int | None = None) -> int:
    """Apply what the view has not seen. Safe beside a running projector of the same view:
    whoever commits a position first wins, the other re-reads from there."""
    done = 0
    n = 0
    while rounds is None or n < rounds:
        n += 1
        position = store.position(view.name)
        head = store.head()  # before the read: positions commit in order on both backends
        records = store.read(position, batch, view.types)
        if not records:
            if head - position >= SKIP_AHEAD:
                # Nothing of ours up to head: move the mark, or every poll re-scans all of it.
                try:
                    store.track(view.name, head)
                except ConcurrencyError:
                    pass
            break
        prepared = view.prepare(records)
        try:
            with store.transaction() as tx:
                view.apply(tx, records, prepared)
                tx.track(view.name, records[-1].position)
        except ConcurrencyError:
            continue  # another follower applied these first
        done += len(records)
    return done


def ensure_view(store: EventStore, view: DeadLettersView) -> None:
    with store.transaction() as tx:
        view.create(tx)


def refresh(store: EventStore) -> None:
    """Set the view up and bring it up to date, before a command or a request reads it
    (so a list right after a failure shows it)."""
    view = DeadLettersView(store)
    ensure_view(store, view)
    catch_up(store, view)


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
    for column in _JSON_COLUMNS:
        row[column] = orjson.loads(row[column]) if row[column] else {}
    return row


def list_dead_letters(
    tx: ViewTransaction, filters: Filters = Filters(), *, limit: int = 100, offset: int = 0, after_seq: int | None = None,
    oldest_first: bool = False,
) -> list[dict[str, Any]]:
    where, params = filters.where()
    if after_seq is not None:
        where += (" AND " if where else " WHERE ") + "seq > ?"
        params.append(after_seq)
    order = "seq ASC" if oldest_first else "seq DESC"
    tx.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE}{where} ORDER BY {order} LIMIT ? OFFSET ?", (*params, limit, offset))
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
    """Every kind the view holds."""
    tx.execute(f"SELECT DISTINCT kind FROM {TABLE}")
    return {r[0] for r in tx.fetchall()}


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


def status_counts(tx: ViewTransaction) -> dict[str, int]:
    tx.execute(f"SELECT status, COUNT(*) FROM {TABLE} GROUP BY status")
    return {s: int(n) for s, n in tx.fetchall()}


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
