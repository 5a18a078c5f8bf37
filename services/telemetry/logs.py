"""Logs: plain text by default, JSON lines with `WEFT_LOG_FORMAT=json`.

A JSON line is one object: time, level, logger, message, and whatever of
execution_id, step_id, item, attempt and trace_id is known where the line was
logged. They come from a context variable that the observed services set
around a step attempt (services/telemetry/observed.py), so a step's own log
lines, and the worker's about it, carry them without passing them around.
When tracing is on, a line logged inside a span also carries its trace and
span ids.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import orjson

from services.telemetry import tracing

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
# The default is read-only: every context shares it, and bind() makes a new mapping rather than changing it.
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("weft_log_context",
                                                                          default=MappingProxyType({}))


def bind(**fields: Any) -> contextvars.Token[Mapping[str, Any]]:
    """Add fields to the log context of the running task (and of what it starts); None values are left out."""
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v is not None}}
    return _context.set(merged)


def unbind(token: contextvars.Token[Mapping[str, Any]]) -> None:
    _context.reset(token)


def current() -> Mapping[str, Any]:
    return _context.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Never raises: a value JSON cannot hold is written as its repr."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_context.get())
        if tracing.enabled():
            from opentelemetry import trace

            sc = trace.get_current_span().get_span_context()
            if sc.is_valid:
                out["trace_id"] = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
                out["otel_trace_id"] = f"{sc.trace_id:032x}"
                out["otel_span_id"] = f"{sc.span_id:016x}"
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(out, default=repr).decode()
        except TypeError:  # a lone surrogate (undecodable bytes from a file name, say): written escaped
            clean = {k: _text(v) if isinstance(v, str) else v for k, v in out.items()}
            return orjson.dumps(clean, default=lambda v: _text(repr(v))).decode()


def _text(value: str) -> str:
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def configure(level: str = "INFO", fmt: str | None = None) -> None:
    """Set up the root logger: `fmt` (or WEFT_LOG_FORMAT) is `text` (the default) or `json`."""
    fmt = (fmt or os.environ.get("WEFT_LOG_FORMAT") or "text").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"WEFT_LOG_FORMAT={fmt!r}: must be one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
