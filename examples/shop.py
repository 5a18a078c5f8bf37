"""Step handlers for the example workflow (examples/order.yaml)."""

from __future__ import annotations

from typing import Any

from weft import NonRetryableError, StepContext


def reserve(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    items = input.get("items") or []
    if not isinstance(items, list):
        raise NonRetryableError("items must be a list")
    return {"ok": bool(items), "order": input["order"], "items": items, "reservation": f"R-{ctx.idempotency_key[-12:]}"}


async def ship(item: Any, ctx: StepContext) -> dict[str, Any]:
    # A flaky carrier: the second parcel fails on its first try, to show retries.
    if ctx.item == 1 and ctx.attempt == 1:
        raise ConnectionError("carrier API timed out")
    return {"sku": item, "parcel": f"P{ctx.item}-{ctx.attempt}"}
