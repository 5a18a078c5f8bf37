"""Publishing trigger events onto their topic (`weft.triggers.<type>` on NATS).

Used by `weft publish` and `POST /v1/triggers`. The broker message id is
derived from (source, id), so a publisher retrying inside the broker's dedup
window stores one message; beyond the window the trigger log catches it.
`dead_letter_rejected` publishes what the webhook and cron paths could not start.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson

from contracts.payloads import make_ref
from contracts.subjects import trigger_subject
from contracts.triggers import CloudEvent
from services.broker import DeadLetter, OutMessage, Transport

if TYPE_CHECKING:
    from services.payloads import Claims
    from services.triggers.ingest import Outcome


def new_event(
    type: str, data: Any = None, *, id: str | None = None, source: str = "weft:cli", subject: str | None = None,
    time: datetime | None = None, **extensions: Any,
) -> CloudEvent:
    """A CloudEvent with a fresh id and the current time unless given (raises pydantic ValidationError)."""
    return CloudEvent.model_validate({
        "id": id or str(uuid.uuid4()), "source": source, "type": type, "subject": subject,
        "time": time or datetime.now(timezone.utc), "data": data, **extensions,
    })


def message_id(source: str, event_id: str) -> str:
    return "trg:" + hashlib.sha256(f"{source}\x00{event_id}".encode()).hexdigest()[:40]


def encode(event: CloudEvent) -> bytes:
    """Structured-mode JSON: absent optional attributes are left out, not null."""
    body = event.model_dump(mode="json", exclude_none=True)
    if event.data is None:
        body.pop("data", None)
    return orjson.dumps(body)


def to_message(event: CloudEvent) -> OutMessage:
    return OutMessage(subject=trigger_subject(event.type), data=encode(event),
                      msg_id=message_id(event.source, event.id),
                      headers={"Content-Type": "application/cloudevents+json"})


async def publish(transport: Transport, event: CloudEvent, claims: Claims | None = None) -> bool:
    """Publish and wait for the broker's ack. False: the broker already had this (source, id).

    With `claims`, the data is measured first: over the payload maximum it is refused
    (PayloadTooLarge, nothing published), over the inline limit it is stored in the blob store
    and the event carries a reference, which the trigger consumer resolves."""
    if claims is not None and event.data is not None:
        encoded = claims.check(event.data, "the trigger's data")
        if len(encoded) > claims.limits.inline:
            digest = await asyncio.to_thread(claims.blobs.put, encoded)
            event = event.model_copy(update={"data": make_ref(digest, len(encoded))})
    return await transport.publish(to_message(event))


def rejected_letters(outcome: Outcome, payload: bytes, *, source_subject: str, key: str | None = None,
                     headers: Mapping[str, str] | None = None, delivered: int = 0) -> list[DeadLetter]:
    """A `trigger_invalid` dead letter per workflow that refused the event's data, keyed by
    (`key`, workflow); `key` is the event's message id unless given."""
    key = key or message_id(outcome.source, outcome.id)
    return [DeadLetter("trigger_invalid", payload, f"workflow {label}: {why}",
                       headers={**(headers or {}), "Weft-Workflow": label}, source_subject=source_subject,
                       delivered=delivered, msg_id=f"{key}:{label}")
            for label, why in outcome.rejected.items()]


async def dead_letter_rejected(transport: Transport, outcome: Outcome, payload: bytes, *, source_subject: str) -> None:
    """What the webhook and cron paths could not start: its `rejected_letters`, in one write."""
    letters = rejected_letters(outcome, payload, source_subject=source_subject)
    if letters:
        await transport.dead_letter_many(letters)
