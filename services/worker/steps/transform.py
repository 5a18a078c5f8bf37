"""`transform` steps: reshape the step's input with one JMESPath expression.

    with: {expression: "items[?qty > `0`].sku"}

The expression is plain JMESPath (no `${{ }}` around it) and is evaluated
against the step's resolved input document *itself*: with input
`{"items": [...]}` the expression is `items[0]`, not `input.items[0]`. Build
the document with the step's `input:` mapping. Evaluation uses
`contracts.expressions`, so the same length, nesting and budget limits apply: going
over the budget (elements, bytes, steps, depth) is a non-retryable TransformError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from contracts.expressions import ExpressionError, compile_expression, evaluate
from services.worker.steps.registry import check_keys, config_error, is_template
from weft.steps import NonRetryableError, StepContext

__all__ = ["TransformStep", "TransformError"]

TYPE = "transform"


class TransformError(NonRetryableError):
    """The expression failed on this input (a type error in a function, a result too big)."""

    def __init__(self, expression: str, reason: str):
        super().__init__(f"transform step: expression {expression!r} failed: {reason}")
        self.expression = expression
        self.reason = reason


class TransformStep:
    def validate_config(self, config: Mapping[str, Any]) -> None:
        check_keys(TYPE, config, ("expression",))
        if "expression" not in config:
            raise config_error(TYPE, "expression", "required: a JMESPath expression over the step input")
        expression = config["expression"]
        if is_template(expression):
            return
        if not isinstance(expression, str):
            raise config_error(TYPE, "expression", f"must be a string, not {type(expression).__name__}")
        try:
            compile_expression(expression)
        except ExpressionError as exc:
            raise config_error(TYPE, "expression", exc.reason) from None

    async def __call__(self, input: Any, config: Mapping[str, Any], ctx: StepContext) -> Any:
        self.validate_config(config)
        expression: str = config["expression"]
        try:
            return evaluate(expression, input)
        except ExpressionError as exc:
            raise TransformError(expression, exc.reason) from None
