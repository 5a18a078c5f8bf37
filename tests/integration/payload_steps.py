"""Step handlers for the payload tests: make big values, measure what arrives."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from weft import StepContext


def make(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """A value of about `size` bytes."""
    return {"blob": "x" * int(input["size"]), "tag": input.get("tag", "")}


def count(input: Any, ctx: StepContext) -> dict[str, Any]:
    """What the step saw: plain values, never a reference."""
    data = orjson.dumps(input)
    assert b"$weft_blob" not in data, "the step saw a reference"
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
