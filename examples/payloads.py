"""The README's large-payload demo (examples/big.yaml): `make` returns a value of `size` bytes,
`count` says how many bytes it received, and their hash (a step always sees plain values)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from weft import StepContext


def make(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"blob": "x" * int(input["size"])}


def count(input: Any, ctx: StepContext) -> dict[str, Any]:
    data = orjson.dumps(input)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
