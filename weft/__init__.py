"""Weft's public API for step authors.

    from weft import StepContext, NonRetryableError

A `python` step's callable takes `(input, ctx: StepContext)` and returns a
JSON-able value, or raises. `NonRetryableError` stops the retries at once.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepContext", "NonRetryableError", "RetryableError", "__version__"]
__version__ = "0.1.0"


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a handler knows about the task it runs."""

    execution_id: str
    step_id: str
    attempt: int  # 1 for the first try
    idempotency_key: str  # same for every attempt of one step (and map item)
    item: int | None = None  # index of the map item, None for a plain step
    workflow: str = ""
    worker_id: str = ""


class NonRetryableError(Exception):
    """Raise from a handler to fail the step at once, with no more attempts."""

    non_retryable = True


class RetryableError(Exception):
    """Raise to fail this attempt, optionally asking for a specific delay."""

    def __init__(self, message: str = "", *, next_retry_delay: float | None = None):
        super().__init__(message)
        self.next_retry_delay = next_retry_delay
