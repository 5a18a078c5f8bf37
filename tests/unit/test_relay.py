"""The relay builds StepReady commands straight from stored JSON: check it agrees with the models."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from contracts import events as ev
from contracts.messages import StepReady
from services.orchestrator.relay import to_message
from services.store import StoredRecord


def _record(event: ev.StepScheduled) -> StoredRecord:
    return StoredRecord(7, uuid.UUID(int=5), 3, event.type, ev.encode(event))


def test_step_ready_matches_the_model() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    event = ev.StepScheduled(
        at=at, step_id="ship", item=2, attempt=3, step_type="python", config={"callable": "a:b"},
        input={"x": [1, 2]}, idempotency_key="k", timeout=4.5, not_before=at + timedelta(seconds=2), reason="retry",
    )
    msg = to_message(_record(event))
    ready = StepReady.model_validate_json(msg.data)
    assert ready == StepReady(
        execution_id=str(uuid.UUID(int=5)), workflow="", step_id="ship", item=2, attempt=3, step_type="python",
        config={"callable": "a:b"}, input={"x": [1, 2]}, idempotency_key="k", timeout=4.5,
        not_before=at + timedelta(seconds=2), scheduled_at=at,
    )
    assert msg.msg_id == ready.message_id == f"{uuid.UUID(int=5)}:ship#2:3"
    assert msg.subject == "weft.steps.python"


def test_plain_step_without_item() -> None:
    at = datetime(2026, 1, 2, tzinfo=timezone.utc)
    event = ev.StepScheduled(at=at, step_id="a", attempt=1, step_type="noop", idempotency_key="k")
    ready = StepReady.model_validate_json(to_message(_record(event)).data)
    assert ready.item is None and ready.not_before is None and ready.config == {}
    assert to_message(_record(event)).msg_id == ready.message_id
