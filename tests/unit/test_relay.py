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
        workflow="shop", workflow_version=4,
    )
    msg = to_message(_record(event))
    ready = StepReady.model_validate_json(msg.data)
    assert ready == StepReady(
        execution_id=str(uuid.UUID(int=5)), workflow="shop", workflow_version=4, step_id="ship", item=2, attempt=3, step_type="python",
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


def test_every_field_of_the_event_reaches_the_command() -> None:
    """Built by the contract: nothing the step's context or the worker needs is dropped."""
    at = datetime(2026, 1, 2, tzinfo=timezone.utc)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    event = ev.StepScheduled(at=at, step_id="a", attempt=1, step_type="noop", idempotency_key="k",
                             secrets={"/config/token": "${{ secrets.T }}"}, trace_id=tp, workflow="w", workflow_version=2)
    msg = to_message(_record(event))
    ready = StepReady.model_validate_json(msg.data)
    assert (ready.workflow, ready.workflow_version, ready.trace_id) == ("w", 2, tp)
    assert ready.secrets == {"/config/token": "${{ secrets.T }}"}
    assert msg.headers is not None and msg.headers["traceparent"] == tp


def test_the_core_schedules_steps_with_their_workflow() -> None:
    from contracts.definitions import parse_definition
    from services.orchestrator.decide import Start, decide
    from services.orchestrator.state import Execution

    wf = parse_definition("name: shop\nsteps: [{id: a, type: noop}]\n")
    events = decide(Execution(id=str(uuid.UUID(int=9))), Start(definition=wf, version=3, content_hash="h"), at_now())
    [scheduled] = [e for e in events if e.type == "StepScheduled"]
    ready = StepReady.model_validate_json(to_message(_record(scheduled)).data)
    assert (ready.workflow, ready.workflow_version) == ("shop", 3)


def at_now() -> datetime:
    return datetime(2026, 1, 2, tzinfo=timezone.utc)
