"""The public API for step authors: what a `python` step's callable gets and may raise.

    from weft import StepContext, NonRetryableError   # re-exported from here

A callable takes `(input, ctx: StepContext)` and returns a JSON-able value, or
raises. `NonRetryableError` stops the retries at once; `RetryableError` fails
this attempt and may ask for a delay.

Workers import this module and nothing else of `weft`: it must stay free of the
CLI (Typer, Rich) and of every other weft module, so that running steps never
loads the command line. tests/unit/test_cli_imports.py holds it to that.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepContext", "NonRetryableError", "RetryableError"]


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a handler knows about the task it runs."""

    execution_id: str
    step_id: str
    attempt: int  # 1 for the first try
    idempotency_key: str  # same for every attempt of one step (and map item)
    item: int | None = None  # index of the map item, None for a plain step
    workflow: str = ""  # the workflow's name
    worker_id: str = ""
    workflow_version: int | None = None  # the published version this execution runs


class NonRetryableError(Exception):
    """Raise from a handler to fail the step at once, with no more attempts."""

    non_retryable = True


class RetryableError(Exception):
    """Raise to fail this attempt, optionally asking for a specific delay."""

    def __init__(self, message: str = "", *, next_retry_delay: float | None = None):
        super().__init__(message)
        self.next_retry_delay = next_retry_delay
