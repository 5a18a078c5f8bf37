"""Time travel: an execution's state as of event N, or as of a moment in time."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

from services.orchestrator.state import Execution, fold


class AtError(ValueError):
    """`--at` is neither a positive event number nor a time; `code` says how to exit (2: bad input, 1: none)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def parse_at(text: str | int) -> int | datetime:
    """An event number (>= 1), or an ISO 8601 time (UTC when it has no zone)."""
    if isinstance(text, int) or str(text).strip().lstrip("-").isdigit():
        n = int(text)
        if n < 1:
            raise AtError(2, "--at: an event number must be 1 or more")
        return n
    raw = str(text).strip()
    try:
        dt = datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError:
        raise AtError(2, f"--at: expected an event number or an ISO 8601 time, got {text!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def events_upto(history: Sequence[Any], at: int | datetime) -> int:
    """How many events of the history make the state as of `at` (the last event at or before a time)."""
    if isinstance(at, int):
        if at > len(history):  # not quietly the last event: the caller asked for one that does not exist
            raise AtError(2, f"--at {at}: the execution has {len(history)} event(s); pick 1 to {len(history)}")
        return at
    n = sum(1 for e in history if e.at <= at)  # histories are in time order: append order
    if n == 0:
        first = history[0].at.isoformat() if history else "?"
        raise AtError(1, f"the execution did not exist yet at {at.isoformat()} (its first event is at {first})")
    return n


def attempts(history: Sequence[Any]) -> list[dict[str, Any]]:
    """Every attempt in these events: step, item, attempt, status, error, worker."""
    out: dict[tuple[str, Any, int], dict[str, Any]] = {}
    for e in history:
        if e.type == "StepScheduled":
            out[(e.step_id, e.item, e.attempt)] = {
                "step_id": e.step_id, "item": e.item, "attempt": e.attempt, "status": "scheduled",
                "scheduled_at": e.at.isoformat(), "error": None, "worker_id": None,
            }
        elif e.type in ("StepSucceeded", "StepFailed") and e.attempt > 0:
            row = out.setdefault((e.step_id, e.item, e.attempt), {
                "step_id": e.step_id, "item": e.item, "attempt": e.attempt, "scheduled_at": None, "error": None})
            row["status"] = "succeeded" if e.type == "StepSucceeded" else "failed"
            row["worker_id"] = e.worker_id
            if e.type == "StepFailed":
                row["error"] = {"type": e.error_type, "message": e.error_message}
        elif e.type == "StepDeadLettered" and (e.step_id, e.item, e.attempt) in out:
            out[(e.step_id, e.item, e.attempt)]["status"] = "dead_lettered"
    return list(out.values())


def state_at(execution_id: str, history: Sequence[Any], at: str | int) -> tuple[Execution, int, list[dict[str, Any]]]:
    """(state as of `at`, events folded, attempts so far). Raises AtError."""
    n = events_upto(history, parse_at(at))
    upto = list(history[:n])
    return fold(execution_id, upto), n, attempts(upto)
