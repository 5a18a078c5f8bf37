"""The expression language inside `${{ }}`: JMESPath, bounded.

JMESPath has no eval, no loops over unbounded ranges and no I/O, so an
expression over a document is safe to run on the orchestrator. We still bound
the expression's length and the size of what it produces, so a definition
cannot make a worker or the orchestrator build a huge value.

A string that is exactly one `${{ expr }}` evaluates to the raw value (a
list stays a list); a string with text around expressions interpolates them
as text. Mappings and lists are walked recursively.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import jmespath
import jmespath.exceptions
import orjson

from contracts.secrets import holds_secrets

MAX_EXPRESSION_CHARS = 2_000
MAX_RESULT_BYTES = 4 * 1024 * 1024

_FULL = re.compile(r"^\s*\$\{\{(.*?)\}\}\s*$", re.DOTALL)
_PART = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)


class ExpressionError(ValueError):
    """An expression that does not parse, or that failed or grew too big."""

    def __init__(self, expression: str, reason: str):
        super().__init__(f"bad expression {expression!r}: {reason}")
        self.expression = expression
        self.reason = reason


@lru_cache(maxsize=4096)
def compile_expression(expression: str) -> Any:
    expr = expression.strip()
    if not expr:
        raise ExpressionError(expression, "empty expression")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(expression[:80], f"longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        return jmespath.compile(expr)
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(expression, str(exc).splitlines()[0]) from None


def expressions_in(template: Any) -> list[str]:
    """Every expression inside a template (strings, dicts, lists)."""
    found: list[str] = []
    if isinstance(template, str):
        found.extend(m.group(1) for m in _PART.finditer(template))
    elif isinstance(template, dict):
        for value in template.values():
            found.extend(expressions_in(value))
    elif isinstance(template, list):
        for value in template:
            found.extend(expressions_in(value))
    return found


def check_template(template: Any) -> None:
    """Raise ExpressionError for the first expression that does not compile."""
    for expr in expressions_in(template):
        compile_expression(expr)
    _check_terminated(template)


def _check_terminated(template: Any) -> None:
    # Every string, however deeply nested, and after its complete `${{ }}`s are cut out.
    if isinstance(template, str):
        if "${{" in _PART.sub("", template):
            raise ExpressionError(template, "unterminated '${{'")
    elif isinstance(template, dict):
        for value in template.values():
            _check_terminated(value)
    elif isinstance(template, list):
        for value in template:
            _check_terminated(value)


def evaluate(expression: str, context: dict[str, Any]) -> Any:
    compiled = compile_expression(expression)
    try:
        value = compiled.search(context)
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(expression, str(exc).splitlines()[0]) from None
    _check_size(expression, value)
    return value


def _check_size(expression: str, value: Any) -> None:
    if isinstance(value, (dict, list, str)):
        size = len(orjson.dumps(value))
        if size > MAX_RESULT_BYTES:
            raise ExpressionError(expression, f"result of {size} bytes is over {MAX_RESULT_BYTES}")


def render(template: Any, context: dict[str, Any]) -> Any:
    """Evaluate every `${{ }}` inside a template against a context.

    A string that refers to `secrets` is left as it is: only the worker resolves it.
    """
    if isinstance(template, str):
        if holds_secrets(template):
            return template
        full = _FULL.match(template)
        if full and "${{" not in full.group(1):
            return evaluate(full.group(1), context)
        if "${{" not in template:
            return template

        def text(match: re.Match[str]) -> str:
            value = evaluate(match.group(1), context)
            if value is None:
                return ""
            if isinstance(value, str):
                return value
            return orjson.dumps(value).decode()

        out = _PART.sub(text, template)
        # Each value is bounded, but many of them glued together must be as well.
        _check_size(template[:80], out)
        return out
    if isinstance(template, dict):
        return {key: render(value, context) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, context) for value in template]
    return template


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, empty string/list/object are false."""
    return not (value is None or value is False or value in ("", [], {}))
