"""Seeing inside Weft: traces (OpenTelemetry), metrics (Prometheus), JSON logs.

  tracing.py   the SDK from the standard OTEL_* variables; traceparent helpers
  hops.py      trace context on broker messages (called by the relay and the worker)
  observed.py  the services' observed subclasses (spans, metrics, log context)
  metrics.py   the Prometheus metrics, the store collector, the broker sampler
  http.py      the gateway's request metrics; the standalone /metrics /healthz /readyz server
  logs.py      WEFT_LOG_FORMAT=json and the log context

Imported by services/stack.py, the gateway, the relay and the worker; imports the
services it wraps (observed.py) and nothing imports it back except those call sites.
"""
