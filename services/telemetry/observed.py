"""The observed services: subclasses services/stack.py builds instead of the plain ones.

Cross-cutting, like Temporal's interceptors: each overrides one method of its
service, calls it, and around it keeps the metrics, opens the spans and sets the
log context. Metrics are always kept (a few counter increments per step); spans
only when tracing is on.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.broker import Delivery
from services.orchestrator.consumer import ResultConsumer
from services.orchestrator.executions import Executions, Outcome
from services.telemetry import logs, metrics, tracing
from services.telemetry.hops import VERSION_HEADER, WORKFLOW_HEADER, result_traceparent
from services.triggers.ingest import Ingestor, Trigger
from services.triggers.ingest import Outcome as TriggerOutcome
from services.worker.runtime import Worker


class ObservedWorker(Worker):
    """The worker, with one span per step attempt, step metrics and the log context."""

    async def execute(self, ready: Any, msg: Delivery | None = None) -> Any:
        began = time.monotonic()
        start = max(ready.scheduled_at, ready.not_before) if ready.not_before else ready.scheduled_at
        m = metrics.step_metrics(ready.step_type)
        m.dispatch.observe(max((datetime.now(timezone.utc) - start).total_seconds(), 0.0))
        headers = msg.headers if msg is not None else {}
        token = logs.bind(execution_id=ready.execution_id, step_id=ready.step_id, item=ready.item,
                          attempt=ready.attempt, trace_id=ready.trace_id)
        try:
            if tracing.enabled():
                result = await self._traced(ready, msg, headers)
            else:
                result = await super().execute(ready, msg)
        finally:
            logs.unbind(token)
        m.attempts[result.status].inc()
        m.duration.observe(time.monotonic() - began)
        return result

    async def _traced(self, ready: Any, msg: Delivery | None, headers: dict[str, str]) -> Any:
        parent = tracing.first_parent(headers.get(tracing.TRACEPARENT), ready.trace_id)
        workflow = headers.get(WORKFLOW_HEADER) or ready.workflow
        attributes: dict[str, Any] = {
            "weft.execution_id": ready.execution_id, "weft.workflow": workflow,
            "weft.workflow.version": headers.get(VERSION_HEADER, ""), "weft.step_id": ready.step_id,
            "weft.step_type": ready.step_type, "weft.attempt": ready.attempt, "weft.worker_id": self.worker_id,
        }
        if ready.item is not None:
            attributes["weft.item"] = ready.item
        name = f"step {ready.step_id}" + (f"#{ready.item}" if ready.item is not None else "")
        with tracing.tracer().start_as_current_span(name, context=parent, kind=SpanKind.CONSUMER,
                                                    attributes=attributes) as span:
            tp = tracing.traceparent_of(span)
            logs.bind(trace_id=tp)
            result = await super().execute(ready, msg)  # msg: its lease is kept alive while it runs
            span.set_attribute("weft.outcome", result.status)
            if result.error is not None:
                span.set_status(Status(StatusCode.ERROR, f"{result.error.type}: {result.error.message}"[:500]))
                span.add_event("exception", {"exception.type": result.error.type,
                                             "exception.message": result.error.message[:4000],
                                             "exception.stacktrace": result.error.traceback or ""})
        result_traceparent.set(tp)
        return result


# ---- orchestrator -----------------------------------------------------------------------------

# message id -> traceparent of the result's message, for the batch being applied (set by the
# consumer, read by apply_results in the thread asyncio.to_thread runs it in: the context goes along).
_batch_parents: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("weft_batch", default=None)


class ObservedResultConsumer(ResultConsumer):
    async def _apply(self, good: list[tuple[Delivery, Any]]) -> None:
        if not tracing.enabled():
            return await super()._apply(good)
        parents = {r.message_id: m.headers.get(tracing.TRACEPARENT, "") for m, r in good}
        token = _batch_parents.set(parents)
        try:
            return await super()._apply(good)
        finally:
            _batch_parents.reset(token)


class ObservedExecutions(Executions):
    """Executions, counting starts and finishes, and tracing starts and decisions."""

    def start(self, version: Any, input: Any, **kw: Any) -> Any:
        span = None
        if kw.get("trace_id") is None and not tracing.enabled():
            kw["trace_id"] = tracing.incoming.get()  # the caller's, recorded as given (the gateway's middleware)
        elif tracing.enabled() and kw.get("trace_id") is None:
            links: list[trace.Link] = []
            if kw.get("replay_of"):  # a replay's trace links to the original's
                try:
                    links = tracing.links_to([self.load(kw["replay_of"]).trace_id])
                except Exception:  # noqa: BLE001 - a bad id is the replay's own error to report
                    links = []
            span = tracing.tracer().start_span(
                f"start {version.name}", links=links,
                attributes={"weft.workflow": version.name, "weft.workflow.version": version.version,
                            **({"weft.replay_of": kw["replay_of"]} if kw.get("replay_of") else {})})
            kw["trace_id"] = tracing.traceparent_of(span)
        try:
            state, created = super().start(version, input, **kw)
        except BaseException as exc:
            if span is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            if span is not None:
                span.end()
        if created:
            metrics.EXECUTIONS_STARTED.labels(version.name).inc()
            if span is not None:
                span.set_attribute("weft.execution_id", state.id)
        return state, created

    def start_many(self, version: Any, inputs: Sequence[Any], **kw: Any) -> list[str]:
        ids = super().start_many(version, inputs, **kw)
        metrics.EXECUTIONS_STARTED.labels(version.name).inc(len(ids))
        return ids

    def apply_results(self, results: Sequence[Any]) -> list[Outcome]:
        began = time.time_ns()
        ids = list(dict.fromkeys(r.execution_id for r in results))
        before = {}
        for eid in ids:
            s = self._get(eid)
            if s is not None:
                before[eid] = s.status
        outcomes = super().apply_results(results)
        by_id = {r.message_id: r for r in results}
        finished: dict[str, str] = {}
        for eid in ids:
            s = self._peek(eid)
            if s is None or not s.version or before.get(eid, "running") == s.status:
                continue
            if s.status == "completed":
                metrics.EXECUTIONS_COMPLETED.labels(s.workflow).inc()
            elif s.status == "failed":
                metrics.EXECUTIONS_FAILED.labels(s.workflow).inc()
            finished[eid] = s.status
        counted: dict[str, int] = {}
        for o in outcomes:
            counted[o.status] = counted.get(o.status, 0) + 1
            r = by_id.get(o.message_id)
            if r is None or o.status != "applied" or r.status != "failed":
                continue
            what = self._after_failure(r)
            if what == "retry":
                metrics.STEP_RETRIES.labels(self._workflow(r.execution_id)).inc()
            elif what == "dead_lettered":
                metrics.STEPS_DEAD_LETTERED.labels(self._workflow(r.execution_id)).inc()
        for status, n in counted.items():
            metrics.RESULTS_APPLIED.labels(status).inc(n)
        parents = _batch_parents.get()
        if parents is not None:
            self._decision_spans(results, outcomes, parents, finished, began)
        return outcomes

    def _workflow(self, execution_id: str) -> str:
        s = self._peek(execution_id)
        return s.workflow if s is not None else ""

    def _after_failure(self, r: Any) -> str:
        """What a failed attempt led to: a retry, a dead letter, or nothing known."""
        s = self._peek(r.execution_id)
        step = s.steps.get(r.step_id) if s is not None else None
        task = step.tasks.get(r.item) if step is not None else None
        if task is None:
            return ""
        if task.status == "dead_lettered":
            return "dead_lettered"
        if task.status == "scheduled" and task.attempt > r.attempt:
            return "retry"
        return ""

    def _decision_spans(self, results: Sequence[Any], outcomes: list[Outcome], parents: dict[str, str],
                        finished: dict[str, str], began: int) -> None:
        tracer = tracing.tracer()
        by_id = {r.message_id: r for r in results}
        for o in outcomes:
            r = by_id.get(o.message_id)
            parent = tracing.context_of(parents.get(o.message_id)) if r is not None else None
            if r is None or parent is None:
                continue
            span = tracer.start_span(
                f"decide {r.step_id}", context=parent, kind=SpanKind.CONSUMER, start_time=began,
                attributes={"weft.execution_id": r.execution_id, "weft.workflow": self._workflow(r.execution_id),
                            "weft.step_id": r.step_id, "weft.attempt": r.attempt, "weft.result": r.status,
                            "weft.decision": o.status, **({"weft.item": r.item} if r.item is not None else {})},
            )
            if o.status == "applied" and r.status == "failed":
                what = self._after_failure(r)
                error = {"error.type": r.error.type, "error.message": r.error.message[:1000]} if r.error else {}
                if what == "retry":
                    span.add_event("retry scheduled", {"weft.next_attempt": r.attempt + 1, **error})
                elif what == "dead_lettered":
                    span.add_event("dead-lettered", error)
            if o.status == "unknown":
                span.set_status(Status(StatusCode.ERROR, o.reason[:500]))
            if r.execution_id in finished:
                span.add_event(f"execution {finished[r.execution_id]}")
            span.end()


class ObservedIngestor(Ingestor):
    """Trigger ingestion: one span per event (joining the trace its CloudEvents `traceparent`
    extension names), whose context the executions it starts record; and their count."""

    def ingest(self, triggers: Sequence[Trigger]) -> list[TriggerOutcome]:
        spans: list[trace.Span] = []
        if tracing.enabled():
            tracer = tracing.tracer()
            for t in triggers:
                span = tracer.start_span(
                    f"trigger {t.event.type}", context=tracing.context_of(t.raw.get(tracing.TRACEPARENT)),
                    kind=SpanKind.CONSUMER,
                    attributes={"cloudevents.event_id": t.event.id, "cloudevents.event_source": t.event.source,
                                "cloudevents.event_type": t.event.type, "weft.trigger.via": t.via})
                spans.append(span)
                t.trace_id = tracing.traceparent_of(span)
        else:  # not tracing: still record the caller's context, for whoever traces downstream
            for t in triggers:
                t.trace_id = tracing.valid(t.raw.get(tracing.TRACEPARENT))
        try:
            outcomes = super().ingest(triggers)
        finally:
            for span in spans:
                span.end()
        for o in outcomes:
            if o.status == "accepted":
                for label in o.executions:
                    metrics.EXECUTIONS_STARTED.labels(label.rsplit("@", 1)[0]).inc()
        return outcomes
