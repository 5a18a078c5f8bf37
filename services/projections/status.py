"""What `weft projections status` shows: each view's position, lag, rate and rebuild state."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

from services.projections.runner import META, view_version
from services.projections.tables import table_exists
from services.store import EventStore

IDLE_AFTER_S = 10.0  # a rate older than this is shown as 0: nothing was applied lately


def projection_status(store: EventStore, views: Sequence[Any]) -> list[dict[str, Any]]:
    """One dict per view. `lag` is positions behind the head of the notification log."""
    meta: dict[str, tuple[Any, ...]] = {}
    with store.reader() as tx:  # no write: a status query never waits for the writer
        if table_exists(tx, META):
            tx.execute(f"SELECT name, position, version, generation, applied, rate, updated_at, rebuilt_at, "
                       f"rebuild_token, rebuild_position, rebuild_head, rebuild_heartbeat FROM {META}")
            meta = {row[0]: row for row in tx.fetchall()}
    head = store.head()
    now = datetime.now(timezone.utc)
    out = []
    for view in views:
        row = meta.get(view.name)
        position = int(row[1]) if row else store.position(view.name)
        rate = float(row[5]) if row and row[5] is not None else 0.0
        updated = row[6] if row else None
        if updated is None or (now - datetime.fromisoformat(updated)).total_seconds() > IDLE_AFTER_S:
            rate = 0.0
        rebuilding = None
        if row and row[8]:
            rebuilding = {"position": row[9], "head": row[10], "heartbeat": row[11]}
        version = int(row[2]) if row else None
        out.append({
            "id": view.name,
            "name": view.name.removeprefix("view:"),
            "tables": list(getattr(view, "t", {}).values()),
            "position": position,
            "head": head,
            "lag": max(head - position, 0),
            "events_per_s": rate,
            "applied": int(row[4]) if row else 0,
            "updated_at": updated,
            "version": version,
            "code_version": view_version(view),
            "needs_rebuild": version is not None and version != view_version(view) and hasattr(view, "tables"),
            "generation": int(row[3]) if row else 0,
            "rebuilt_at": row[7] if row else None,
            "rebuilding": rebuilding,
        })
    return out
