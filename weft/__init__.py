"""Weft's public API for step authors.

    from weft import StepContext, NonRetryableError

A `python` step's callable takes `(input, ctx: StepContext)` and returns a
JSON-able value, or raises. `NonRetryableError` stops the retries at once.

Also here, imported on first use so that a worker importing a step module
loads none of them: `Workflow` (code-first workflows, weft.workflow),
`Client` / `AsyncClient` and their errors (weft.client), and `weft.testing`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepContext", "NonRetryableError", "RetryableError", "Workflow", "Client", "AsyncClient", "Run",
           "AsyncRun", "WeftError", "__version__"]
__version__ = "0.1.0"


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


_LAZY = {"Workflow": "weft.workflow", "Expr": "weft.workflow", "input_": "weft.workflow", "output_of": "weft.workflow",
         "item": "weft.workflow", "Client": "weft.client", "AsyncClient": "weft.client", "Run": "weft.client",
         "AsyncRun": "weft.client", "WeftError": "weft.errors"}


def __getattr__(name: str) -> object:
    # PEP 562: `weft.Client` imports httpx and the gateway's models only when asked for.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weft' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
