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


SHIPS_TO = {"FR", "DE", "UK", "US"}


def ship(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Refuses, for good, a country it does not ship to: the README's "Bad input? Patch it." demo
    (`weft dlq reprocess ID --patch '{"country": "FR"}'`)."""
    country = input.get("country")
    if country not in SHIPS_TO:
        raise NonRetryableError(f"we do not ship to {country!r} (only to {', '.join(sorted(SHIPS_TO))})")
    return {"parcel": f"P-{input['order']}-{country}"}
