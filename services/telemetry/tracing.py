"""Tracing: OpenTelemetry's SDK configured from its standard environment variables.

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`,
...) or an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); `OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none` turn it off. Unlike the SDK's own default (otlp),
nothing set means off: a `weft up` on a laptop must not try to reach a collector
that is not there. Everything else is the SDK's: `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` (Resource.create), `OTEL_TRACES_SAMPLER[_ARG]`
(TracerProvider's default sampler), `OTEL_EXPORTER_OTLP_*` (the exporter),
`OTEL_BSP_*` (the batch processor), `OTEL_PROPAGATORS`.

With tracing off, `enabled()` is False and every helper here returns at once:
the hot paths test one module global and do nothing else.

Trace context is carried as a W3C `traceparent` string: recorded on
ExecutionStarted (and on each StepScheduled of a traced execution), and in the
`traceparent` header of StepReady and StepResult messages.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger("weft.telemetry")

TRACEPARENT = "traceparent"
# version-traceid-spanid-flags, as W3C Trace Context level 1 writes it (lower-case hex).
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_TRUE = {"1", "true", "yes", "on"}

_enabled = False
_provider: Any = None  # the SDK TracerProvider we installed, for shutdown()


def enabled() -> bool:
    return _enabled


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OTEL_* variables ask for traces."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    names = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if names:
        return names != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def exporter_names(env: Mapping[str, str] | None = None) -> list[str]:
    """OTEL_TRACES_EXPORTER's names as the SDK's entry points name them (otlp -> otlp_proto_http|grpc)."""
    env = os.environ if env is None else env
    names = [n.strip() for n in (env.get("OTEL_TRACES_EXPORTER") or "otlp").split(",") if n.strip()]
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip()
    out = []
    for name in names:
        if name == "otlp":
            if protocol == "grpc":
                name = "otlp_proto_grpc"
            elif protocol == "http/protobuf":
                name = "otlp_proto_http"
            else:
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: Weft supports http/protobuf and grpc")
        out.append(name)
    return out


def setup(service_name: str = "weft", env: Mapping[str, str] | None = None) -> bool:
    """Install a TracerProvider with the exporters the environment asks for; True if tracing is on.

    `service_name` is only a default: OTEL_SERVICE_NAME wins (Resource.create reads it).
    Idempotent: a second call in one process does nothing.
    """
    global _enabled, _provider
    env = os.environ if env is None else env
    if _enabled or not wanted(env):
        return _enabled
    from importlib.metadata import entry_points

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = []
    for name in exporter_names(env):
        found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
        if not found:
            package = {"otlp_proto_grpc": "opentelemetry-exporter-otlp-proto-grpc"}.get(name, f"the {name} exporter")
            raise RuntimeError(f"OTEL_TRACES_EXPORTER: no trace exporter {name!r} is installed (install {package})")
        exporters.append(found[0].load()())
    attributes: dict[str, Any] = {}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    _instrument_httpx()
    _enabled = True
    log.info("tracing on: exporting to %s", ", ".join(exporter_names(env)))
    return True


def shutdown() -> None:
    """Flush what is buffered (the batch processor's queue) before the process exits."""
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception:  # noqa: BLE001 - an unreachable collector must not block the exit
            log.debug("tracing: shutdown failed", exc_info=True)


def _instrument_httpx() -> None:
    # The `http` step's outgoing calls become child spans of the step's span, and carry
    # its traceparent to the server they call.
    try:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor().instrument()
    except Exception:  # noqa: BLE001 - a missing instrumentation costs the child spans, not the service
        log.warning("tracing: httpx instrumentation unavailable", exc_info=True)


def instrument_app(app: Any) -> None:
    """Server spans for the gateway's requests (FastAPI instrumentation); nothing with tracing off."""
    if not _enabled:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics")


# With tracing off, the gateway still notes a request's `traceparent` here, so the execution it
# starts records the caller's context for whoever traces downstream (services/telemetry/http.py).
incoming: contextvars.ContextVar[str | None] = contextvars.ContextVar("weft_incoming_traceparent", default=None)


def tracer() -> trace.Tracer:
    return trace.get_tracer("weft")


# ---- trace context as strings -----------------------------------------------------------------


def valid(traceparent: Any) -> str | None:
    """The traceparent if it is one (W3C level 1 shape, not all-zero ids), else None."""
    if not isinstance(traceparent, str) or len(traceparent) != 55 or not _TRACEPARENT.match(traceparent):
        return None
    if traceparent[3:35] == "0" * 32 or traceparent[36:52] == "0" * 16 or traceparent.startswith("ff"):
        return None
    return traceparent


def context_of(traceparent: str | None) -> otel_context.Context | None:
    """An OpenTelemetry context whose remote parent is `traceparent` (None when there is none)."""
    tp = valid(traceparent)
    if tp is None:
        return None
    return propagate.extract({TRACEPARENT: tp})


def span_context_of(traceparent: str | None) -> trace.SpanContext | None:
    ctx = context_of(traceparent)
    if ctx is None:
        return None
    sc = trace.get_current_span(ctx).get_span_context()
    return sc if sc.is_valid else None


def traceparent_of(span: trace.Span | None = None) -> str | None:
    """The traceparent naming `span` (the current span by default), or None."""
    ctx = trace.set_span_in_context(span) if span is not None else None
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return valid(carrier.get(TRACEPARENT))


def current_traceparent() -> str | None:
    """The traceparent of the active span when tracing is on (the request's, the trigger's)."""
    if not _enabled:
        return None
    return traceparent_of()


def first_parent(*candidates: str | None) -> otel_context.Context | None:
    for tp in candidates:
        ctx = context_of(tp)
        if ctx is not None:
            return ctx
    return None


def links_to(traceparents: Iterable[str | None]) -> list[trace.Link]:
    links = []
    for tp in traceparents:
        sc = span_context_of(tp)
        if sc is not None:
            links.append(trace.Link(sc))
    return links
