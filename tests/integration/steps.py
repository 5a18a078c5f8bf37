"""Step handlers used by the integration tests."""

from __future__ import annotations

from typing import Any

from weft import NonRetryableError, StepContext


def positive(input: dict[str, Any], ctx: StepContext) -> int:
    if input["n"] <= 0:
        raise ValueError(f"n must be positive, got {input['n']}")
    return input["n"]


def refuse(input: Any, ctx: StepContext) -> None:
    raise NonRetryableError("refused")
