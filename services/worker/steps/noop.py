"""`noop` steps: return the input unchanged (joins, placeholders, tests)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.worker.steps.registry import check_keys
from weft.steps import StepContext

__all__ = ["NoopStep"]


class NoopStep:
    def validate_config(self, config: Mapping[str, Any]) -> None:
        check_keys("noop", config, ())

    async def __call__(self, input: Any, config: Mapping[str, Any], ctx: StepContext) -> Any:
        return input
