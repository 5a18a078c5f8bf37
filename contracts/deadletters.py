"""Dead letters: what failed for good, and what users did about it.

Two sources make a dead letter:

* a step: the `StepDeadLettered` event of an execution (retries exhausted, a
  non-retryable error, an input that could not be computed). That event is
  already the durable record; its dead letter id is derived from the
  execution id and the event's version, so a rebuilt view finds the same ids.
* a broker message (undecodable, schema-invalid, for an unknown execution or
  step, past MaxDeliver, an invalid or unroutable trigger): published raw to
  the DLQ stream, then recorded as `DeadLetterRecorded` in its own stream,
  whose id derives from the source message's identity (`Weft-Dlq-Msg-Id`).

What users do is an event in the dead letter's stream too
(`DeadLetterReprocessed`, `DeadLetterDiscarded`), so every act is audited.
This module imports nothing else of Weft's.
"""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

_NS = uuid.UUID("6f0b8a52-2d7c-4e4a-9a7b-5d3c1e9f0a17")

OPEN, REPROCESSED, DISCARDED = "open", "reprocessed", "discarded"
STATUSES = (OPEN, REPROCESSED, DISCARDED)

# Kinds of step dead letters, from StepDeadLettered.reason.
STEP_KINDS = ("retries_exhausted", "non_retryable", "input_error")
# Kinds of message dead letters, as published with `transport.dead_letter(kind, ...)`.
MESSAGE_KINDS = ("poison", "unknown_task", "max_deliver", "trigger_invalid", "trigger_unroutable", "trigger_failed")

# Header names of a DLQ message (set by the broker adapter's dead_letter()).
REASON_HEADER = "Weft-Dlq-Reason"
SOURCE_SUBJECT_HEADER = "Weft-Dlq-Source-Subject"
DELIVERED_HEADER = "Weft-Dlq-Delivered"
KIND_HEADER = "Weft-Dlq-Kind"
MSG_ID_HEADER = "Weft-Dlq-Msg-Id"
DLQ_HEADERS = (REASON_HEADER, SOURCE_SUBJECT_HEADER, DELIVERED_HEADER, KIND_HEADER, MSG_ID_HEADER)
# On a message `weft dlq reprocess` republished: the id of the dead letter it came from.
REPROCESSED_FROM_HEADER = "Weft-Reprocessed-From"

# What a message dead letter's error is called, by kind (a step's comes from its StepFailed).
ERROR_TYPES = {
    "poison": "UndecodableMessage",
    "unknown_task": "UnknownTask",
    "max_deliver": "MaxDeliverExceeded",
    "trigger_invalid": "InvalidTrigger",
    "trigger_unroutable": "UnroutableTrigger",
    "trigger_failed": "TriggerIngestFailed",
}


def step_kind(reason: str) -> str:
    """The kind of a step dead letter, from StepDeadLettered.reason."""
    text = reason.lower()
    if "non-retryable" in text or "non_retryable" in text:
        return "non_retryable"
    if "input" in text:
        return "input_error"
    return "retries_exhausted"


def step_dead_letter_id(execution_id: str, version: int) -> str:
    """The id of the dead letter made by the StepDeadLettered at `version` of an execution."""
    return str(uuid.uuid5(_NS, f"step\x00{execution_id}\x00{version}"))


def message_key(stream: str, seq: int) -> str:
    """The identity of a broker message for its dead letter (the `msg_id` given to dead_letter(),
    carried as Weft-Dlq-Msg-Id): its stream and its sequence there. Whoever dead-letters the same
    message (its consumer as poison, the MaxDeliver capture) names the same dead letter."""
    return f"dlq:{stream}:{seq}"


def message_dead_letter_id(key: str) -> str:
    """The id of the dead letter of one source message (`key`: its Weft-Dlq-Msg-Id)."""
    return str(uuid.uuid5(_NS, f"message\x00{key}"))


def encode_payload(data: bytes) -> tuple[str, str]:
    """Bytes to (text, encoding): UTF-8 text as is, anything else base64. Lossless."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def decode_payload(text: str, encoding: str) -> bytes:
    return base64.b64decode(text) if encoding == "base64" else text.encode("utf-8")


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = 1
    at: datetime
    dead_letter_id: str


class DeadLetterRecorded(_Event):
    """A broker message reached the DLQ stream and is now in the store (version 1 of its stream)."""

    type: Literal["DeadLetterRecorded"] = "DeadLetterRecorded"
    kind: str
    key: str  # the source message's identity; the stream id derives from it
    source_subject: str = ""
    payload: str  # see encode_payload
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    headers: dict[str, str] = {}  # the source message's own headers (Weft-Dlq-* removed)
    reason: str = ""
    delivered: int = 0
    dlq_seq: int = 0  # sequence in the DLQ stream: tells a redelivery from a new sighting


class DeadLetterSeen(_Event):
    """The same source message was dead-lettered again (e.g. after a crash, past the dedup window)."""

    type: Literal["DeadLetterSeen"] = "DeadLetterSeen"
    kind: str
    reason: str = ""
    delivered: int = 0
    dlq_seq: int = 0


class DeadLetterReprocessed(_Event):
    type: Literal["DeadLetterReprocessed"] = "DeadLetterReprocessed"
    by: str
    why: str | None = None
    patch: dict[str, Any] | None = None
    action: Literal["reprocess_step", "republish"]
    execution_id: str | None = None  # reprocess_step: the execution that reopened
    subject: str | None = None  # republish: where it went
    msg_id: str | None = None  # republish: the broker dedup id used


class DeadLetterDiscarded(_Event):
    type: Literal["DeadLetterDiscarded"] = "DeadLetterDiscarded"
    by: str
    why: str


EVENT_TYPES: dict[str, type[_Event]] = {
    cls.model_fields["type"].default: cls
    for cls in (DeadLetterRecorded, DeadLetterSeen, DeadLetterReprocessed, DeadLetterDiscarded)
}


def encode(event: _Event) -> bytes:
    return orjson.dumps(event.model_dump(mode="json"))


def decode(type_name: str, data: bytes) -> Any:
    raw = orjson.loads(data)
    raw.setdefault("type", type_name)
    return EVENT_TYPES[type_name].model_validate(raw)


def status_of(events: list[Any]) -> str:
    """A dead letter's status from its own stream: the last act wins."""
    status = OPEN
    for e in events:
        if e.type == "DeadLetterReprocessed":
            status = REPROCESSED
        elif e.type == "DeadLetterDiscarded":
            status = DISCARDED
    return status
