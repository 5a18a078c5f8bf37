"""Bulk replay: replay every execution a filter selects, as one idempotent operation.

The filter (`workflow=W,status=failed,since=24h,until=...,version=N,limit=N`)
selects from the executions view. The operation id is given, or derived from
the filter text and the replay options, and each replay's execution id from
(operation id, source id): running the same command again starts only what
is new, never a second replay of the same source. The operation's own replays
are never selected as sources, even when they match the filter.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from services.orchestrator.executions import Executions
from services.orchestrator.registry import Registry
from services.projections import ExecutionsView, catch_up, list_executions
from services.replay.operations import Progress, Run, check_id, derive_id
from services.replay.replay import ReplayError, parse_version, replay_execution, replay_id
from services.store import EventStore

STATUSES = ("running", "paused", "completed", "failed", "cancelled")
_KEYS = ("workflow", "status", "since", "until", "version", "limit")
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    text: str  # normalised: key=value,... sorted by key
    workflow: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    version: int | None = None
    limit: int | None = None


def parse_time(name: str, value: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC if no zone), or a duration back from now: 30m, 24h, 7d, 2w."""
    text = value.strip()
    rel = _RELATIVE.match(text)
    if rel:
        now = now or datetime.now(timezone.utc)
        try:
            return now - timedelta(**{_UNITS[rel.group(2)]: int(rel.group(1))})
        except (OverflowError, ValueError):  # 100000000000000000000h: before year 1
            raise ReplayError("bad_input", f"{name}: {value!r} reaches before year 1") from None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ReplayError("bad_input", f"{name}: not a time: {value!r} (ISO 8601, or 30m, 24h, 7d)") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def parse_filter(text: str, now: datetime | None = None) -> ReplayFilter:
    fields: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ReplayError("bad_input", f"--filter: expected key=value, got {part!r}")
        if key not in _KEYS:
            raise ReplayError("bad_input", f"--filter: unknown key {key!r} (known: {', '.join(_KEYS)})")
        if key in fields:
            raise ReplayError("bad_input", f"--filter: {key} given twice")
        fields[key] = value
    if not fields:
        raise ReplayError("bad_input", "--filter: empty; e.g. workflow=orders,status=failed,since=24h")
    if "status" in fields and fields["status"] not in STATUSES:
        raise ReplayError("bad_input", f"--filter: status must be one of {', '.join(STATUSES)}")
    normal = ",".join(f"{k}={fields[k]}" for k in sorted(fields))
    parsed: dict[str, Any] = {"workflow": fields.get("workflow"), "status": fields.get("status")}
    for key in ("since", "until"):
        if key in fields:
            parsed[key] = parse_time(f"--filter {key}", fields[key], now)
    for key in ("version", "limit"):
        if key in fields:
            if not fields[key].isdigit() or not 1 <= int(fields[key]) <= 2**31 - 1:
                raise ReplayError("bad_input", f"--filter: {key} must be a number from 1 to {2**31 - 1}")
            parsed[key] = int(fields[key])
    return ReplayFilter(text=normal, **parsed)


def select(store: EventStore, flt: ReplayFilter, operation_id: str, *, page: int = 500) -> list[dict[str, Any]]:
    """The executions the filter selects, oldest first, from the (caught-up) executions view."""
    catch_up(store, [ExecutionsView()])
    out: list[dict[str, Any]] = []
    cursor: tuple[str, str] | None = None
    while flt.limit is None or len(out) < flt.limit:
        with store.reader() as tx:
            rows = list_executions(
                tx, workflow=flt.workflow, status=flt.status, version=flt.version, oldest_first=True, limit=page,
                since=flt.since.isoformat() if flt.since else None, until=flt.until.isoformat() if flt.until else None,
                after=cursor,
            )
        if not rows:
            break
        cursor = (rows[-1]["started_at"], rows[-1]["id"])
        for row in rows:
            if row["replay_of"] and row["id"] == replay_id(row["workflow"], operation_id, row["replay_of"]):
                continue  # this operation's own replay: never a source of it
            out.append(row)
    return out[: flt.limit] if flt.limit else out


def bulk_replay(
    store: EventStore, filter: str | ReplayFilter, *, from_step: str | None = None, input_patch: Any = None,
    version: str | int = "same", dry_run: bool = False, operation_id: str | None = None,
    progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Replay every execution the filter selects; returns the operation's report (for the CLI and the API).

    Item outcomes: started, skipped (this operation already replayed it), failed
    (with `error`), and in a dry run would_start. Raises ReplayError for a bad
    filter or options (nothing is started then).
    """
    flt = parse_filter(filter) if isinstance(filter, str) else filter
    spec = parse_version(version)
    params = {"filter": flt.text, "from_step": from_step, "input_patch": input_patch, "version": spec}
    if operation_id is not None:
        try:
            op = check_id("--operation-id", operation_id)
        except ValueError as exc:
            raise ReplayError("bad_input", str(exc)) from None
    else:
        op = derive_id("replay", params)
    sources = select(store, flt, op)
    run = Run(store, op, "replay", params, len(sources), dry_run=dry_run, progress=progress)
    executions, registry = Executions(store), Registry(store)
    cancelled = False
    for row in sources:
        if should_stop is not None and should_stop():
            cancelled = True
            break
        new_id = replay_id(row["workflow"], op, row["id"])
        item: dict[str, Any] = {"id": row["id"], "source": row["id"], "workflow": row["workflow"],
                                "source_status": row["status"], "execution_id": new_id}
        if store.load(uuid.UUID(new_id), upto_version=1):
            item["outcome"] = "skipped"
        else:
            try:
                result = replay_execution(
                    store, row["id"], from_step=from_step, input_patch=input_patch, version=spec, dry_run=dry_run,
                    idempotency_key=op, executions=executions, registry=registry,
                )
                item["outcome"] = "would_start" if dry_run else ("started" if result["created"] else "skipped")
                item["reuse"] = result["reuse"]
            except ReplayError as exc:
                item["outcome"], item["error"] = "failed", str(exc)
        run.add(item)
    return {
        "id": op, "operation_id": op, "kind": "replay", "filter": flt.text, "dry_run": dry_run,
        "from_step": from_step, "input_patch": input_patch, "version": spec, **run.finish(cancelled=cancelled),
        "items": run.items,
    }
