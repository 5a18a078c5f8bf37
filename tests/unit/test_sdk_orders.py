"""The code-first order example (examples/orders.py) under weft.testing: no stack, milliseconds."""

from __future__ import annotations

from examples.orders import orders
from weft import testing

ORDER = {"order_id": "A-1", "items": ["book", "lamp"]}


def test_the_order_runs_end_to_end_with_the_real_steps() -> None:
    result = testing.run(orders, ORDER)
    assert result.status == "completed"
    assert result.output == {"order": "A-1", "summary": {"parcels": ["P0-1", "P1-2"], "count": 2}}
    # the flaky carrier: the second parcel took two attempts, the first one
    assert result.attempts("ship_each", item=1) == 2 and result.attempts("ship_each", item=0) == 1
    assert [e["type"] for e in result.events(step_id="ship_each", type="StepFailed")] == ["StepFailed"]


def test_the_order_with_the_carrier_mocked() -> None:
    result = testing.run(orders, ORDER, mocks={"ship_each": {"sku": "x", "parcel": "P-1"}})
    assert result.status == "completed"
    assert result.output == {"order": "A-1", "summary": {"parcels": ["P-1", "P-1"], "count": 2}}
    assert [c[0] for c in result.calls] == ["reserve", "ship_each", "ship_each", "summary"]
    assert result.history[0]["type"] == "ExecutionStarted" and result.history[-1]["type"] == "ExecutionCompleted"
    assert [e["seq"] for e in result.history] == list(range(1, len(result.history) + 1))


def test_an_order_without_items_skips_the_summary() -> None:
    result = testing.run(orders, {"order_id": "A-2"})
    assert result.status == "completed"
    assert result.output == {"order": "A-2", "summary": None}
    assert result.events(type="StepSkipped", step_id="summary")
