"""Trigger events: CloudEvents 1.0 (structured JSON mode) and the trigger log.

Every accepted trigger event is recorded in the event store as a
`TriggerAccepted` event, in its own stream named by `trigger_stream(source, id)`,
so (source, id) is the idempotency key forever, not only inside a broker's
dedup window, and backfill can run past events through a workflow again.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_NS = uuid.UUID("3c6b1f0e-4d8a-4f7e-9a51-2e0c7d4b8f63")


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 event in structured JSON mode."""

    model_config = ConfigDict(extra="allow", frozen=True)  # extension attributes are allowed
    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1, max_length=256)
    source: str = Field(min_length=1, max_length=1024)
    type: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    subject: str | None = Field(None, max_length=1024)
    time: datetime | None = None
    datacontenttype: str | None = "application/json"
    data: Any = None


def trigger_stream(source: str, event_id: str) -> uuid.UUID:
    """The event-store stream of one trigger event: its (source, id) names it."""
    return uuid.uuid5(_NS, f"trigger\x00{source}\x00{event_id}")


class TriggerAccepted(BaseModel):
    """A trigger event that was received and routed; the full event is kept for backfill."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["TriggerAccepted"] = "TriggerAccepted"
    schema_version: int = 1
    at: datetime  # when Weft received it
    event: dict[str, Any]  # the CloudEvent as received (model_dump(mode="json"))
    via: str = "topic"  # topic | webhook | cron | http
    executions: dict[str, str] = {}  # "workflow@version" -> execution id started for it
    filtered: list[str] = []  # "workflow@version" subscribed to the type, but its filter did not match
    rejected: dict[str, str] = {}  # "workflow@version" -> why it could not start (input invalid); dead-lettered
