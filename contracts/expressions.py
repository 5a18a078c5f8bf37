"""The expression language inside `${{ }}`: JMESPath, with a budget.

JMESPath has no eval, no loops over unbounded ranges and no I/O, so an
expression over a document is safe to run on the orchestrator, but not cheap:
`[@, @]` doubles a value without copying it (the list holds two references), so
`input.v | [@,@] | [@,@] ...` (40 times, 327 characters) stands for a value of
2^40 elements that a serializer then tries to write out. So evaluation runs in
`BoundedInterpreter`, which charges every value the expression *creates* by the
size it will have when serialized (elements and bytes, references counted each
time they appear, measured without building anything) and every AST node it
visits, and raises ExpressionBudgetError as soon as one budget is spent. Values
the expression only reads (`input.x`, `steps.a.output`) cost nothing: their
size is the payload policy's business. Compiling checks the expression's length
and nesting, so a parser or interpreter never recurses deeply.

A string that is exactly one `${{ expr }}` evaluates to the raw value (a
list stays a list); a string with text around expressions interpolates them
as text. Mappings and lists are walked recursively. One `render` shares one
budget between all the expressions of its template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jmespath.exceptions
import orjson
from jmespath import functions, lexer, parser, visitor

from contracts.secrets import holds_secrets
from contracts.values import MAX_DEPTH, ValueProblem, check_value

if TYPE_CHECKING:  # a parsed expression's node: a plain dict at run time, typed by types-jmespath
    from jmespath.visitor import _TreeNode as Node

MAX_EXPRESSION_CHARS = 2_000
MAX_NESTING = 32  # brackets, braces and parentheses inside one another
MAX_AST_DEPTH = 128  # parsed nodes inside one another (a pipe or a projection adds one)
BUDGET_ELEMENTS = 1_000_000  # elements of the values one render creates (a 10,000-item map is ~50,000)
BUDGET_BYTES = 64 * 1024 * 1024  # bytes (as compact JSON) of the values one render creates
BUDGET_STEPS = 2_000_000  # AST nodes one render visits (2 to 3 s of CPU on a busy 2-core machine)
MAX_VALUE_DEPTH = MAX_DEPTH  # nesting of a created value

_FULL = re.compile(r"^\s*\$\{\{(.*?)\}\}\s*$", re.DOTALL)
_PART = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
_OPEN = frozenset({"lbracket", "lbrace", "lparen", "filter"})
_CLOSE = frozenset({"rbracket", "rbrace", "rparen"})
_UNARY = frozenset({"not", "expref"})
# Functions that return a new container; the others return a scalar or one of their arguments.
_CREATING = frozenset({"keys", "values", "map", "merge", "reverse", "sort", "sort_by", "to_array"})


class ExpressionError(ValueError):
    """An expression that does not parse, or that failed or grew too big."""

    def __init__(self, expression: str, reason: str):
        expression = _short(expression)
        super().__init__(f"bad expression {expression!r}: {reason}")
        self.expression = expression
        self.reason = reason
        self.path: str | None = None  # the field of a definition it sits in, when known


class ExpressionBudgetError(ExpressionError):
    """Evaluation went over a budget (`limit` names it: elements, bytes, steps, depth).
    Not retryable: the same expression over the same data goes over it again."""

    non_retryable = True

    def __init__(self, expression: str, limit: str, reason: str):
        super().__init__(expression, reason)
        self.limit = limit


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:200] + "…"


@dataclass(slots=True)
class Budget:
    """What one render (or one evaluate) may spend. Shared by all its expressions."""

    elements: int = BUDGET_ELEMENTS
    bytes: int = BUDGET_BYTES
    steps: int = BUDGET_STEPS
    depth: int = MAX_VALUE_DEPTH
    used_elements: int = 0
    used_bytes: int = 0
    used_steps: int = 0
    # id -> (value, elements, bytes, depth): the value is kept so that its id stays its own.
    sizes: dict[int, tuple[Any, int, int, int]] = field(default_factory=dict)

    def charge(self, expression: str, value: Any) -> None:
        elements, size, depth = self.measure(expression, value)
        self.used_elements += elements
        self.used_bytes += size
        if depth > self.depth:
            raise ExpressionBudgetError(expression, "depth", f"creates a value nested deeper than {self.depth} levels")
        self._check(expression)

    def spend_elements(self, expression: str, count: int) -> None:
        """Charge `count` elements made outside the interpreter (a map's tasks)."""
        self.used_elements += count
        self._check(expression)

    def _check(self, expression: str) -> None:
        if self.used_elements > self.elements:
            raise ExpressionBudgetError(
                expression, "elements", f"creates more than {self.elements} elements (the expression budget)")
        if self.used_bytes > self.bytes:
            raise ExpressionBudgetError(
                expression, "bytes", f"creates more than {self.bytes} bytes (the expression budget)")

    def measure(self, expression: str, value: Any) -> tuple[int, int, int]:
        """(elements, bytes, depth) of `value` serialized, without serializing it: each container is
        measured once, however often it is referenced. Stops as soon as the budget cannot hold it."""
        scalar = _scalar_size(value)
        if scalar is not None:
            return 1, scalar, 0
        sizes = self.sizes
        known = sizes.get(id(value))
        if known is not None:
            return known[1], known[2], known[3]
        room = self.elements - self.used_elements
        visited = 0
        todo: list[tuple[Any, bool]] = [(value, False)]
        while todo:
            item, ready = todo.pop()
            if id(item) in sizes:
                continue
            # dict.values: a payload reference (contracts.payloads.Guarded) refuses .values() to
            # expressions, but passing it on whole is allowed and costs its reference's size.
            members = dict.values(item) if isinstance(item, dict) else item
            if not ready:
                visited += 1
                if visited > room:
                    raise ExpressionBudgetError(
                        expression, "elements", f"creates more than {self.elements} elements (the expression budget)")
                todo.append((item, True))
                todo.extend((m, False) for m in members if _scalar_size(m) is None and id(m) not in sizes)
                continue
            elements, size, depth = 1, 2, 1
            for m in members:
                s = _scalar_size(m)
                if s is None:
                    _, e, b, d = sizes[id(m)]
                    elements, size, depth = elements + e, size + b + 1, max(depth, d + 1)
                else:
                    elements, size = elements + 1, size + s + 1
            if isinstance(item, dict):
                size += sum(len(k) + 3 for k in item)
            sizes[id(item)] = (item, elements, size, depth)
        _, elements, size, depth = sizes[id(value)]
        return elements, size, depth


def _scalar_size(value: Any) -> int | None:
    """Bytes of a scalar as JSON (roughly: a string counts its characters); None for containers."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, (dict, list, tuple)):
        return None
    return 8


# jmespath's functions keep no state: one table for every evaluation, not one built per call.
_OPTIONS = visitor.Options(custom_functions=functions.Functions())


class BoundedInterpreter(visitor.TreeInterpreter):
    """jmespath's tree interpreter, charging what it visits and creates to a Budget."""

    def __init__(self, expression: str, budget: Budget):
        super().__init__(_OPTIONS)
        self.expression = expression
        self.budget = budget

    def visit(self, node: Node, *args: Any, **kwargs: Any) -> Any:
        budget = self.budget
        budget.used_steps += 1
        if budget.used_steps > budget.steps:
            raise ExpressionBudgetError(
                self.expression, "steps", f"takes more than {budget.steps} steps (the expression budget)")
        return super().visit(node, *args, **kwargs)

    def _made(self, value: Any) -> Any:
        if isinstance(value, (list, dict)):
            self.budget.charge(self.expression, value)
        return value

    def visit_multi_select_list(self, node: Node, value: Any) -> Any:
        return self._made(super().visit_multi_select_list(node, value))

    def visit_multi_select_dict(self, node: Node, value: Any) -> Any:
        return self._made(super().visit_multi_select_dict(node, value))

    def visit_projection(self, node: Node, value: Any) -> Any:
        return self._made(super().visit_projection(node, value))

    def visit_value_projection(self, node: Node, value: Any) -> Any:
        return self._made(super().visit_value_projection(node, value))

    def visit_filter_projection(self, node: Node, value: Any) -> Any:
        return self._made(super().visit_filter_projection(node, value))

    def visit_flatten(self, node: Node, value: Any) -> Any:
        return self._made(super().visit_flatten(node, value))

    def visit_slice(self, node: Node, value: Any) -> Any:
        return self._made(super().visit_slice(node, value))

    def visit_function_expression(self, node: Node, value: Any) -> Any:
        result = super().visit_function_expression(node, value)
        if isinstance(result, str) and node["value"] in ("join", "to_string"):
            self.budget.used_bytes += len(result)  # built from what was charged or read already
            self.budget._check(self.expression)
        elif node["value"] in _CREATING:
            self._made(result)
        return result


@lru_cache(maxsize=4096)
def compile_expression(expression: str) -> Any:
    """The parsed expression (cached). ExpressionError if it is empty, too long, nested too deeply,
    or does not parse."""
    expr = expression.strip()
    if not expr:
        raise ExpressionError(expression, "empty expression")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(expression[:80], f"longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        _check_nesting(expr)
        compiled = parser.Parser().parse(expr)
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(expression, str(exc).splitlines()[0]) from None
    except RecursionError:
        raise ExpressionError(expression, f"nested deeper than {MAX_NESTING} levels") from None
    _check_tree(expression, compiled.parsed)
    return compiled


def _check_nesting(expr: str) -> None:
    # The parser recurses once per bracket level and per `!`/`&` in a row: refuse deep ones before parsing.
    depth = deepest = unary = 0
    for token in lexer.Lexer().tokenize(expr):
        kind = token["type"]
        if kind in _OPEN:
            depth += 1
        elif kind in _CLOSE:
            depth -= 1
        unary = unary + 1 if kind in _UNARY else 0
        deepest = max(deepest, depth + unary)
        if deepest > MAX_NESTING:
            raise ExpressionError(expr, f"nested deeper than {MAX_NESTING} levels (brackets, parentheses, '!', '&')")


def _check_tree(expression: str, tree: Node) -> None:
    todo: list[tuple[Any, int]] = [(tree, 1)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_AST_DEPTH:
            raise ExpressionError(expression, f"more than {MAX_AST_DEPTH} operations inside one another")
        if node.get("type") == "literal":
            try:
                check_value(node.get("value"), "literal", max_depth=MAX_NESTING)
            except ValueProblem as exc:
                raise ExpressionError(expression, str(exc)) from None
        todo.extend((child, depth + 1) for child in node.get("children", ()) if isinstance(child, dict))


def expressions_in(template: Any) -> list[str]:
    """Every expression inside a template (strings, dicts, lists)."""
    return [expr for _, expr in expressions_with_paths(template, "")]


def expressions_with_paths(template: Any, path: str) -> list[tuple[str, str]]:
    """(path, expression) for every expression inside a template: `input.v`, `input.items[2]`."""
    found: list[tuple[str, str]] = []
    todo: list[tuple[Any, str]] = [(template, path)]
    while todo:
        item, where = todo.pop()
        if isinstance(item, str):
            found.extend((where, m.group(1)) for m in _PART.finditer(item))
        elif isinstance(item, dict):
            todo.extend((v, f"{where}.{k}" if where else str(k)) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            todo.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(item))))
    return found


def check_template(template: Any, path: str = "") -> None:
    """Raise ExpressionError for the first expression that does not compile, or a `${{` left open.
    With `path`, the error's `path` attribute names the field it sits in."""
    for where, expr in expressions_with_paths(template, path):
        try:
            compile_expression(expr)
        except ExpressionError as exc:
            exc.path = where
            raise
    todo: list[tuple[Any, str]] = [(template, path)]
    while todo:
        item, where = todo.pop()
        if isinstance(item, str):
            if "${{" in _PART.sub("", item):
                open_error = ExpressionError(item, "unterminated '${{'")
                open_error.path = where
                raise open_error
        elif isinstance(item, dict):
            todo.extend((v, f"{where}.{k}" if where else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((v, f"{where}[{i}]") for i, v in enumerate(item))


def evaluate(expression: str, context: dict[str, Any], budget: Budget | None = None) -> Any:
    """The value of one expression over `context`, within `budget` (a fresh one if None)."""
    compiled = compile_expression(expression)
    interpreter = BoundedInterpreter(expression, budget if budget is not None else Budget())
    try:
        return interpreter.visit(compiled.parsed, context)
    except ExpressionError:
        raise
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(expression, str(exc).splitlines()[0]) from None
    except RecursionError:
        raise ExpressionBudgetError(expression, "depth", "recursed too deeply (data nested too deeply?)") from None
    except MemoryError:
        raise ExpressionBudgetError(expression, "memory", "ran out of memory") from None
    except Exception as exc:  # noqa: BLE001 - a pure computation over data: whatever fails is the expression's
        raise ExpressionError(expression, f"{type(exc).__name__}: {exc}") from None


def render(template: Any, context: dict[str, Any], budget: Budget | None = None) -> Any:
    """Evaluate every `${{ }}` inside a template against a context, within one budget.

    A string that refers to `secrets` is left as it is: only the worker resolves it.
    """
    budget = budget if budget is not None else Budget()
    if isinstance(template, str):
        if holds_secrets(template):
            return template
        full = _FULL.match(template)
        if full and "${{" not in full.group(1):
            return evaluate(full.group(1), context, budget)
        if "${{" not in template:
            return template

        def text(match: re.Match[str]) -> str:
            value = evaluate(match.group(1), context, budget)
            if value is None:
                return ""
            if isinstance(value, str):
                budget.used_bytes += len(value)
                budget._check(template)
                return value
            budget.charge(match.group(1), value)  # measured before it is written out in full
            try:
                return orjson.dumps(value).decode()
            except (TypeError, orjson.JSONEncodeError) as exc:
                raise ExpressionError(match.group(1), f"cannot be written as text: {exc}") from None

        return _PART.sub(text, template)
    if isinstance(template, dict):
        return {key: render(value, context, budget) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, context, budget) for value in template]
    return template


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, empty string/list/object are false."""
    return not (value is None or value is False or value in ("", [], {}))
