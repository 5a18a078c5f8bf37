"""The dead-letter demo's step code (README: "When a step fails for good").

The payment gateway is "down" until a file `gateway-up` exists in the worker's working
directory: `charge` fails (and is retried, then dead-lettered) until you create it.
"""

from __future__ import annotations

import os
from typing import Any

from weft import NonRetryableError, StepContext


def charge(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    if input["amount"] <= 0:
        raise NonRetryableError(f"cannot charge {input['amount']}: amounts must be positive")
    if not os.path.exists("gateway-up"):
        raise ConnectionError(f"payment gateway unreachable while charging order {input['order']}")
    return {"order": input["order"], "charged": input["amount"], "idempotency_key": ctx.idempotency_key}


def ship(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"order": input["order"], "carrier": "eu-post" if input.get("country") != "US" else "usps",
            "parcel": f"P-{input['order']}"}
