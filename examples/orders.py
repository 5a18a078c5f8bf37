"""The order example (examples/order.yaml with examples/shop.py), written code-first.

    weft up --steps examples.orders                 # in one terminal, from the repository root
    weft workflows publish examples.orders:orders   # in another
    python -m examples.orders                       # start one and wait for it, with weft.Client

`tests/unit/test_sdk_orders.py` runs it with `weft.testing`, with no stack at all.
"""

from __future__ import annotations

from pydantic import BaseModel

from weft import NonRetryableError, StepContext, Workflow
from weft.workflow import input_, output_of


class OrderIn(BaseModel):
    order_id: str
    items: list[str] = []


class ReserveIn(BaseModel):
    order: str
    items: list[str] | None = None  # `${{ input.items }}` is null when the order has none


class Reservation(BaseModel):
    ok: bool
    order: str
    items: list[str]
    reservation: str


class Parcel(BaseModel):
    sku: str
    parcel: str


orders = Workflow("orders", input_schema=OrderIn, on=["order.placed"])


@orders.step(input={"order": input_.order_id, "items": input_["items"]},
             retry={"max_attempts": 3, "initial_delay": 0.1}, timeout=30)
def reserve(input: ReserveIn, ctx: StepContext) -> Reservation:
    if not input.order.strip():
        raise NonRetryableError("order must not be blank")
    items = input.items or []
    return Reservation(ok=bool(items), order=input.order, items=items,
                       reservation=f"R-{ctx.idempotency_key[-12:]}")


@orders.step(needs=[reserve], map=output_of(reserve)["items"],
             retry={"max_attempts": 3, "initial_delay": 0.2, "max_delay": 2})
async def ship_each(item: str, ctx: StepContext) -> Parcel:
    # A flaky carrier: the second parcel fails on its first try, to show retries.
    if ctx.item == 1 and ctx.attempt == 1:
        raise ConnectionError("carrier API timed out")
    return Parcel(sku=item, parcel=f"P{ctx.item}-{ctx.attempt}")


summary = orders.transform("summary", "{parcels: shipped[].parcel, count: length(shipped)}", needs=[ship_each],
                           when=output_of(reserve).ok, input={"shipped": output_of(ship_each)})

orders.output = {"order": input_.order_id, "summary": output_of(summary)}


def main() -> None:
    """Start one order on a running stack (`weft up`) and wait for it."""
    import os
    import sys

    import weft

    # The gateway: argv[1], else WEFT_URL, else the one `weft up` wrote into .weft/stack.json.
    with weft.Client(sys.argv[1] if len(sys.argv) > 1 else None, api_key=os.environ.get("WEFT_API_KEY")) as client:
        client.publish_workflow(orders)
        run = client.start("orders", input={"order_id": "A-1", "items": ["book", "lamp"]}, idempotency_key="A-1")
        result = run.wait(timeout=60)
        print(result.status, result.output)


if __name__ == "__main__":
    main()
