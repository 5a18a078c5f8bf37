"""The dead-letter metric: open dead letters by kind and workflow.

An OpenTelemetry observable gauge (`weft.dlq.open`), read from the view when a
metric reader collects, so it is never stale by more than the view's lag. A
kind/workflow pair that had open dead letters and has none now reports 0
instead of vanishing, so dashboards see the drop. `prometheus_text` renders the
same numbers in the Prometheus exposition format for a `/metrics` endpoint or
`weft dlq stats --prometheus`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation, get_meter

from services.deadletters.view import open_counts
from services.store import EventStore

log = logging.getLogger("weft.deadletters")
GAUGE = "weft.dlq.open"


class OpenDeadLettersGauge:
    def __init__(self, store: EventStore, meter: Meter | None = None):
        self.store = store
        self._known: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        meter = meter or get_meter("weft.deadletters")
        self.instrument = meter.create_observable_gauge(
            GAUGE, callbacks=[self._observe], unit="{dead_letter}",
            description="Open dead letters (not reprocessed, not discarded), by kind and workflow",
        )

    def counts(self) -> list[tuple[str, str, int]]:
        with self.store.reader() as tx:
            return open_counts(tx)

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        try:
            counts = self.counts()
        except Exception:  # a metric must never take the service down; skip this collection
            log.warning("deadletters: cannot read open counts for the metric", exc_info=True)
            return []
        with self._lock:
            now = {(k, w): n for k, w, n in counts}
            self._known |= set(now)
            keys = sorted(self._known)
        return [Observation(now.get(key, 0), {"kind": key[0], "workflow": key[1]}) for key in keys]


def prometheus_text(counts: Sequence[tuple[str, str, int]]) -> str:
    lines = [
        "# HELP weft_dlq_open Open dead letters (not reprocessed, not discarded), by kind and workflow.",
        "# TYPE weft_dlq_open gauge",
    ]
    for kind, workflow, n in counts:
        lines.append(f'weft_dlq_open{{kind="{_label(kind)}",workflow="{_label(workflow)}"}} {n}')
    return "\n".join(lines) + "\n"


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
