"""Broker subject and stream names. One place, so every adapter agrees."""

from __future__ import annotations

STEPS_STREAM = "WEFT_STEPS"
RESULTS_STREAM = "WEFT_RESULTS"
TRIGGERS_STREAM = "WEFT_TRIGGERS"
DLQ_STREAM = "WEFT_DLQ"

STEPS_PREFIX = "weft.steps"
RESULTS_PREFIX = "weft.results"
TRIGGERS_PREFIX = "weft.triggers"
DLQ_PREFIX = "weft.dlq"

# stream name -> the subjects it captures
STREAMS: dict[str, list[str]] = {
    STEPS_STREAM: [f"{STEPS_PREFIX}.>"],
    RESULTS_STREAM: [f"{RESULTS_PREFIX}.>"],
    TRIGGERS_STREAM: [f"{TRIGGERS_PREFIX}.>"],
    DLQ_STREAM: [f"{DLQ_PREFIX}.>"],
}


def _token(value: str) -> str:
    # NATS subject tokens may not contain '.', '*', '>' or whitespace.
    out = []
    for ch in value:
        out.append("_" if ch in ".*> \t\r\n" else ch)
    return "".join(out) or "_"


def step_subject(step_type: str) -> str:
    return f"{STEPS_PREFIX}.{_token(step_type)}"


def result_subject(execution_id: str) -> str:
    return f"{RESULTS_PREFIX}.{_token(execution_id)}"


def trigger_subject(event_type: str) -> str:
    # CloudEvents types are dotted (order.created): keep the dots as subject levels.
    return f"{TRIGGERS_PREFIX}.{'.'.join(_token(t) for t in event_type.split('.'))}"


def dlq_subject(kind: str) -> str:
    return f"{DLQ_PREFIX}.{_token(kind)}"
