"""Trace context at the broker hops: what the relay and the worker call.

The relay calls `step_headers` (a StepReady's headers: its execution's trace
context) and `traced_publish` (a producer span per traced command); the worker
calls `result_headers` (the StepResult's headers: the step attempt's span, set by
services/telemetry/observed.py's ObservedWorker). With tracing off these are a
dictionary lookup and a test of a module global.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.broker import OutMessage
from services.telemetry import metrics, tracing

WORKFLOW_HEADER = "weft-workflow"
VERSION_HEADER = "weft-workflow-version"

# ---- relay -------------------------------------------------------------------------------------


def step_headers(event: Any) -> dict[str, str] | None:
    """Headers of the StepReady for a stored StepScheduled: its execution's trace context."""
    tp = event.trace_id
    if tp is None:
        return None
    headers = {tracing.TRACEPARENT: tp}
    if event.workflow:
        headers[WORKFLOW_HEADER] = str(event.workflow)
        headers[VERSION_HEADER] = str(event.workflow_version or "")
    return headers


async def traced_publish(publish: Callable[[Sequence[OutMessage]], Awaitable[None]],
                         messages: list[OutMessage]) -> None:
    """The relay's publish of a batch: one producer span per traced command, ended when acked."""
    if not tracing.enabled():
        await publish(messages)
        metrics.RELAY_PUBLISHED.inc(len(messages))
        return
    spans: list[trace.Span] = []
    out: list[OutMessage] = []
    tracer = tracing.tracer()
    for m in messages:
        parent = tracing.context_of((m.headers or {}).get(tracing.TRACEPARENT))
        if parent is None:
            out.append(m)
            continue
        span = tracer.start_span(f"relay publish {m.subject}", context=parent, kind=SpanKind.PRODUCER,
                                 attributes={"messaging.system": "weft", "messaging.destination.name": m.subject,
                                             "messaging.message.id": m.msg_id or ""})
        spans.append(span)
        headers = dict(m.headers or {})
        headers[tracing.TRACEPARENT] = tracing.traceparent_of(span) or headers[tracing.TRACEPARENT]
        out.append(dataclasses.replace(m, headers=headers))
    try:
        await publish(out)
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
        raise
    for span in spans:
        span.end()
    metrics.RELAY_PUBLISHED.inc(len(messages))


# ---- worker ------------------------------------------------------------------------------------

result_traceparent: contextvars.ContextVar[str | None] = contextvars.ContextVar("weft_result_tp", default=None)


def result_headers() -> dict[str, str] | None:
    """Headers for the StepResult being published: the step attempt's span (set by ObservedWorker)."""
    tp = result_traceparent.get()
    return {tracing.TRACEPARENT: tp} if tp else None
