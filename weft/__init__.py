"""Weft's public API for step authors.

    from weft import StepContext, NonRetryableError

A `python` step's callable takes `(input, ctx: StepContext)` and returns a
JSON-able value, or raises. `NonRetryableError` stops the retries at once.
These three live in weft.steps (what workers import); `import weft` loads
neither the CLI (weft.cli) nor Typer or Rich.

Also here, imported on first use so that a worker importing a step module
loads none of them: `Workflow` (code-first workflows, weft.workflow),
`Client` / `AsyncClient` and their errors (weft.client), and `weft.testing`.
"""

from __future__ import annotations

from weft.steps import NonRetryableError, RetryableError, StepContext

__all__ = ["StepContext", "NonRetryableError", "RetryableError", "Workflow", "Client", "AsyncClient", "Run",
           "AsyncRun", "WeftError", "__version__"]
__version__ = "0.1.0"

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
