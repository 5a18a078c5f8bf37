"""Acting on many dead letters: batching, cancellation, one outcome per dead letter.

Step dead letters go 100 to a transaction (`Actions.reprocess_steps` / `discard_many`);
messages one by one (each is a publish). A cancel stops before the next batch: the one
in hand is stored whole or not at all, and the rest are reported `cancelled`, so a run
can be repeated and only does what is left. No UI here: progress is a callback.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from services.deadletters.actions import Outcome
from services.deadletters.view import ts

Row = dict[str, Any]
BATCH = 100


def chunked(rows: Sequence[Row], size: int = BATCH) -> list[list[Row]]:
    """`size` rows to a batch, in order (what a discard stores per transaction)."""
    return [list(rows[i : i + size]) for i in range(0, len(rows), size)]


def batches(rows: Sequence[Row], size: int = BATCH) -> list[list[Row]]:
    """A reprocess's batches: step dead letters `size` to a transaction, then each message on its own."""
    return chunked([r for r in rows if r["source"] == "step"], size) + [[r] for r in rows if r["source"] != "step"]


async def run_batches(
    chunks: Sequence[Sequence[Row]], act: Callable[[list[Row]], Awaitable[list[Outcome]]], *,
    cancelled: asyncio.Event, progress: Callable[[int], None] = lambda n: None,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for chunk in chunks:
        if cancelled.is_set():
            outcomes += [_unfinished(r, "cancelled", "not attempted: cancelled") for r in chunk]
            continue
        try:
            outcomes += await act(list(chunk))
        except Exception as exc:  # one batch's trouble must not hide the others' outcomes
            outcomes += [_unfinished(r, "failed", f"{type(exc).__name__}: {exc}") for r in chunk]
        progress(len(chunk))
    return outcomes


def _unfinished(row: Row, outcome: str, detail: str) -> Outcome:
    return Outcome(row["id"], outcome, row["kind"], row.get("execution_id"), row.get("step_id"), detail, ok=False)


_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: datetime | None = None) -> str:
    """An ISO time, or an age (`30m`, `2h`, `7d`) before now, in the view's time form. ValueError if neither."""
    m = _AGE.fullmatch(text)
    if m:
        now = now or datetime.now(timezone.utc)
        return ts(now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)]))
    return ts(text.strip())
