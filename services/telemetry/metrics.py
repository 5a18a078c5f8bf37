"""Prometheus metrics of every service, with prometheus_client.

Counters and histograms are moved by the wrappers in services/telemetry/hops.py
(and the gateway's middleware, services/telemetry/http.py). What lives in the
store or on the broker is read when it is asked for: `StoreCollector` reads the
relay's and each projection's lag and the open dead letters at scrape time;
`BrokerSampler` asks the broker for the commands and results waiting, every few
seconds (the broker's client is async, a scrape is not).

One registry per process (prometheus_client's default), as a Prometheus client
expects: `weft up` runs every service in one process and serves them all on the
gateway's /metrics; a standalone service serves its own on WEFT_METRICS_PORT.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from contracts.subjects import RESULTS_STREAM, STEPS_STREAM
from services.store import EventStore

log = logging.getLogger("weft.telemetry")

# Seconds: a step is usually milliseconds, a slow one minutes.
LAG_CAP = 10_000  # a scrape counts at most this many waiting events
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

EXECUTIONS_STARTED = Counter("weft_executions_started", "Executions started, by workflow", ["workflow"])
EXECUTIONS_COMPLETED = Counter("weft_executions_completed", "Executions completed, by workflow", ["workflow"])
EXECUTIONS_FAILED = Counter("weft_executions_failed", "Executions failed, by workflow", ["workflow"])
STEP_ATTEMPTS = Counter("weft_step_attempts", "Step attempts run by workers, by step type and outcome",
                        ["step_type", "outcome"])
STEP_DURATION = Histogram("weft_step_duration_seconds", "Time a worker spent running one step attempt",
                          ["step_type"], buckets=_DURATION_BUCKETS)
DISPATCH_LATENCY = Histogram(
    "weft_step_dispatch_latency_seconds",
    "From a step being scheduled (or its retry backoff ending) to a worker starting it",
    ["step_type"], buckets=_DURATION_BUCKETS,
)
STEP_RETRIES = Counter("weft_step_retries", "Step attempts that failed and were scheduled again", ["workflow"])
STEPS_DEAD_LETTERED = Counter("weft_steps_dead_lettered", "Steps that exhausted their retries or failed for good",
                              ["workflow"])
RESULTS_APPLIED = Counter("weft_results_applied", "Step results the orchestrator applied, by outcome", ["outcome"])
RELAY_PUBLISHED = Counter("weft_relay_published", "StepReady commands the relay published")
HTTP_DURATION = Histogram("weft_http_request_duration_seconds", "Gateway request latency, by route and status",
                          ["method", "route", "status"], buckets=_DURATION_BUCKETS)
BROKER_PENDING = Gauge("weft_broker_pending", "Messages waiting on the broker for a consumer (not yet acked)",
                       ["stream", "consumer"])


class StepMetrics:
    """One step type's children of the step metrics, looked up once: `labels()` takes a lock and
    builds a tuple each call, a few microseconds that every step would pay."""

    __slots__ = ("dispatch", "duration", "attempts")

    def __init__(self, step_type: str):
        self.dispatch = DISPATCH_LATENCY.labels(step_type)
        self.duration = STEP_DURATION.labels(step_type)
        self.attempts = {o: STEP_ATTEMPTS.labels(step_type, o) for o in ("succeeded", "failed")}


_step_metrics: dict[str, StepMetrics] = {}


def step_metrics(step_type: str) -> StepMetrics:
    found = _step_metrics.get(step_type)
    if found is None:
        found = _step_metrics[step_type] = StepMetrics(step_type)
    return found


def exposition(registry: Any = REGISTRY) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


class StoreCollector(Collector):
    """Lags and open dead letters, read from the store when Prometheus scrapes.

    `followers` are the tracked names whose lag this process reports (the relay's, the
    projections'), each with the event types it waits for: for the relay, StepScheduled
    events past its saved position (the commands not yet published; it saves its position
    only after publishing, so the other events past it are no lag), counted up to LAG_CAP;
    for a projection (types None), every event past its position. A process reports only
    the parts it runs, so a deployment's numbers are not repeated by every service. A scrape that cannot read the store reports nothing
    for these (and says so in the log) rather than failing the whole scrape.
    """

    def __init__(self, store: EventStore, followers: Sequence[tuple[str, Sequence[str] | None]] = (), *,
                 dead_letters: bool = False):
        self.store, self.followers, self.dead_letters = store, list(followers), dead_letters
        self._known: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Nothing up front: the registry then does not read the store when this is registered,
        # and two stacks in one process (tests) may each register one.
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self.followers:
            lag = GaugeMetricFamily("weft_log_lag_events",
                                    "Events in the store's log not yet handled by a follower (relay, projections)",
                                    labels=["follower"])
            try:
                head = self.store.head()
                for name, types in self.followers:
                    position = self.store.position(name)
                    if types is None:
                        lag.add_metric([name], max(head - position, 0))
                    else:
                        lag.add_metric([name], len(self.store.read(position, LAG_CAP, list(types))))
            except Exception:  # noqa: BLE001 - a metric must never take a scrape (or a service) down
                log.warning("metrics: cannot read the log's positions", exc_info=True)
            else:
                yield lag
        if self.dead_letters:
            from services.deadletters.view import open_counts

            try:
                with self.store.reader() as tx:
                    counts = open_counts(tx)
            except Exception:  # noqa: BLE001 - the view may not exist yet, or the store is away
                log.warning("metrics: cannot read open dead letters", exc_info=True)
                return
            family = GaugeMetricFamily("weft_dlq_open", "Open dead letters (not reprocessed, not discarded)",
                                       labels=["kind", "workflow"])
            with self._lock:  # a pair that had dead letters and has none now reports 0, not nothing
                now = {(k, w): n for k, w, n in counts}
                self._known |= set(now)
                keys = sorted(self._known)
            for key in keys:
                family.add_metric(list(key), now.get(key, 0))
            yield family


class BrokerSampler:
    """Commands and results waiting on the broker, sampled every `period` seconds.

    Asks the transport's `backlog(stream, durable)` (pending + unacked); a transport
    without it reports nothing.
    """

    def __init__(self, transport: Any, durables: Sequence[tuple[str, str]], period: float = 2.0):
        self.transport, self.durables, self.period = transport, list(durables), period

    async def run(self, stop: asyncio.Event) -> None:
        backlog = getattr(self.transport, "backlog", None)
        if backlog is None or not self.durables:
            return
        while not stop.is_set():
            for stream, durable in self.durables:
                try:
                    BROKER_PENDING.labels(stream, durable).set(await backlog(stream, durable))
                except Exception:  # noqa: BLE001 - the broker is away, or the consumer not made yet
                    log.debug("metrics: no backlog for %s/%s", stream, durable, exc_info=True)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.period)
            except asyncio.TimeoutError:
                pass


COMMANDS = (STEPS_STREAM, "workers")
RESULTS = (RESULTS_STREAM, "orchestrator")
