"""`sleep` steps: wait, then return `{"slept": seconds}`.

    with: {seconds: 5}        # or leave it out and pass `input: {seconds: ...}`

0 <= seconds <= 24 h. The wait is a plain `asyncio.sleep`, so cancelling the
task (worker shutdown, step timeout) ends it at once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

from services.worker.steps.registry import StepInputError, check_keys, config_error, is_template
from weft.steps import StepContext

__all__ = ["SleepStep", "MAX_SLEEP_SECONDS"]

TYPE = "sleep"
MAX_SLEEP_SECONDS = 24 * 60 * 60


def _problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number of seconds, not {type(value).__name__}"
    if not math.isfinite(value) or value < 0:
        return f"must be >= 0, got {value!r}"
    if value > MAX_SLEEP_SECONDS:
        return f"must be at most {MAX_SLEEP_SECONDS} (24 h), got {value!r}"
    return None


class SleepStep:
    def validate_config(self, config: Mapping[str, Any]) -> None:
        check_keys(TYPE, config, ("seconds",))
        if "seconds" in config and not is_template(config["seconds"]):
            problem = _problem(config["seconds"])
            if problem:
                raise config_error(TYPE, "seconds", problem)

    async def __call__(self, input: Any, config: Mapping[str, Any], ctx: StepContext) -> Any:
        self.validate_config(config)
        if "seconds" in config:
            seconds = config["seconds"]
            problem = _problem(seconds)
            if problem:
                raise config_error(TYPE, "seconds", problem)
        else:
            if not isinstance(input, Mapping) or "seconds" not in input:
                raise StepInputError(TYPE, "seconds", "required when `with.seconds` is not set")
            seconds = input["seconds"]
            problem = _problem(seconds)
            if problem:
                raise StepInputError(TYPE, "seconds", problem)
        await asyncio.sleep(seconds)
        return {"slept": seconds}
