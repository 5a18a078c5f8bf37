"""What a JSON value from outside may be: the limits every entrance checks before storing it.

Python's `json` reads things the rest of Weft cannot carry: integers of any size
(orjson, SQLite and PostgreSQL stop at 64 bits), NaN and infinities (orjson writes
them as null, silently), lone UTF-16 surrogates such as `"\\ud800"` (not Unicode:
they cannot be encoded as UTF-8), and nesting deep enough to overflow a recursive
serializer (orjson stops at 255 levels). `check_value` walks a value once,
without recursion, and names the first offending field and the limit.
`loads` parses JSON text with those checks.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Deep enough for any real document, far below orjson's 255 and Python's recursion limit,
# with room for the envelopes (event, message, dead letter) that wrap a value.
MAX_DEPTH = 100
# Elements in one value (every list item, object member and scalar counts once). A 1 MiB
# body holds at most ~500,000; this also stops a YAML alias bomb before it is expanded.
MAX_ELEMENTS = 2_000_000
MIN_INT = -(2**63)
MAX_INT = 2**63 - 1


class ValueProblem(ValueError):
    """A value that cannot be stored or carried: `path` names the field, `message` the limit."""

    def __init__(self, path: str, message: str):
        if len(path) > 160:  # 100 levels of [0] say little more than their ends do
            path = path[:80] + "…" + path[-60:]
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{_safe(repr(key))}]"


def _safe(text: str) -> str:
    # An error message must itself be encodable, even when it quotes a lone surrogate.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bad_string(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_value(value: Any, path: str = "value", *, max_depth: int = MAX_DEPTH,
                max_elements: int = MAX_ELEMENTS) -> None:
    """Raise ValueProblem for the first thing in `value` Weft could not store or carry."""
    # The common case is a good value: walk it fast, without paths, and only when something is
    # wrong walk it again, naming the field.
    if _fine(value, max_depth, max_elements):
        return
    _name_problem(value, path, max_depth, max_elements)


def _fine(value: Any, max_depth: int, max_elements: int) -> bool:
    todo: list[tuple[Any, int]] = [(value, 0)]
    pop, push = todo.pop, todo.append
    seen = 0
    while todo:
        item, depth = pop()
        seen += 1
        kind = type(item)
        if kind is str:
            if not item.isascii() and _bad_string(item):
                return False
        elif kind is dict:
            if depth >= max_depth:
                return False
            for key, member in item.items():
                if type(key) is str and not key.isascii() and _bad_string(key):
                    return False
                push((member, depth + 1))
        elif kind is list:
            if depth >= max_depth:
                return False
            for member in item:
                push((member, depth + 1))
        elif kind is int:
            if not MIN_INT <= item <= MAX_INT:
                return False
        elif kind is float:
            if not math.isfinite(item):
                return False
        elif item is None or kind is bool:
            pass
        else:
            return False  # a subclass or another type: let the careful walk judge it
        if seen > max_elements:
            return False
    return True


def _name_problem(value: Any, path: str, max_depth: int, max_elements: int) -> None:
    todo: list[tuple[Any, str, int]] = [(value, path, 0)]
    seen = 0
    while todo:
        item, where, depth = todo.pop()
        seen += 1
        if seen > max_elements:
            raise ValueProblem(path, f"more than {max_elements} elements")
        if isinstance(item, str):
            if _bad_string(item):
                raise ValueProblem(where, "contains a lone UTF-16 surrogate (e.g. \\ud800), which is not Unicode")
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not MIN_INT <= item <= MAX_INT:
                raise ValueProblem(where, f"integer out of the 64-bit range ({MIN_INT} to {MAX_INT})")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueProblem(where, "not a finite number (NaN and infinities are not JSON)")
        elif isinstance(item, (dict, list)):
            if depth >= max_depth:
                raise ValueProblem(where, f"nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, member in dict.items(item):
                    if isinstance(key, str) and _bad_string(key):
                        raise ValueProblem(_join(where, _safe(key)),
                                           "key contains a lone UTF-16 surrogate (e.g. \\ud800), which is not Unicode")
                    todo.append((member, _join(where, key), depth + 1))
            else:
                todo.extend((member, _join(where, i), depth + 1) for i, member in enumerate(item))


def elements_in(text: str | bytes) -> int:
    """How many values check_value would count in this JSON text, from C-speed passes only:
    outside strings, the root, one per comma, and the first item of each non-empty container
    (exact for compact JSON; whitespace inside an empty container makes it count one more)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    # escapes first (an escaped backslash, then an escaped quote): then every quote delimits a string
    outside = text.replace("\\\\", "").replace('\\"', "").split('"')[::2]
    return 1 + sum(p.count(",") + p.count("[") + p.count("{") - p.count("[]") - p.count("{}") for p in outside)


def loads(text: str | bytes, path: str = "body") -> Any:
    """JSON text to a value that passed check_value. Raises ValueProblem (also for text that is
    not JSON, or so deep that the parser itself gives up)."""
    if len(text) > 2 * MAX_ELEMENTS and elements_in(text) > MAX_ELEMENTS:
        # Refused before parsing: the parser builds the whole value first, and 20 MB of `[{},{},...]`
        # is 7 million objects, half a gigabyte, before check_value could count them.
        raise ValueProblem(path, f"more than {MAX_ELEMENTS} elements")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueProblem(path, f"nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise ValueProblem(path, "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueProblem(path, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    check_value(value, path)
    return value
