"""Secret references: `${{ secrets.NAME }}` in a step's `with:` and `input:`.

A secret is named in the definition and resolved only on the worker, at the
last moment (services/worker/secrets.py). Everything before that (the
orchestrator's rendering, the events, the broker messages) carries the
reference, never the value. This module is the pure part both sides share:
recognising references, listing where a step has them, and substituting.

Rules a definition must follow (`problems`):

* a reference is exactly `secrets.NAME` (NAME: letters, digits, `_`); no
  other expression may mention `secrets` (no `secrets`, `keys(secrets)`, ...);
* a string that holds a reference holds only references and plain text
  (`"Bearer ${{ secrets.TOKEN }}"`), never another expression. Data rendered
  into a string could otherwise smuggle in a reference of its own choosing;
  here the orchestrator leaves such strings untouched and the worker
  substitutes only at the places the definition put references (`locate`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["CREDENTIAL_HEADERS", "NAME", "reference", "mentions_secrets", "holds_secrets", "locate", "substitute", "problems",
           "names_in", "set_at"]

NAME = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
_PART = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
_REFERENCE = re.compile(rf"^\s*secrets\.({NAME})\s*$")
# `secrets` as a root name: not `input.secrets`, not `my_secrets`.
_MENTION = re.compile(r"(?<![\w.\"'`])secrets(?![\w])")
MAX_REFERENCES = 1_000
# Headers that carry credentials: an `http` step may take them only from secrets, and drops them
# (with every header that came from a secret) when a redirect leaves the origin.
CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-auth-token", "x-access-token",
})


def reference(expression: str) -> str | None:
    """The secret's name when `expression` (the inside of `${{ }}`) is `secrets.NAME`, else None."""
    match = _REFERENCE.match(expression)
    return match.group(1) if match else None


def mentions_secrets(expression: str) -> bool:
    return bool(_MENTION.search(expression))


def holds_secrets(text: str) -> bool:
    """True when a template string has an expression that mentions `secrets`: it is rendered on the worker."""
    return "secrets" in text and any(mentions_secrets(m.group(1)) for m in _PART.finditer(text))


def names_in(text: str) -> list[str]:
    return [name for m in _PART.finditer(text) if (name := reference(m.group(1)))]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def locate(template: Any, prefix: str) -> dict[str, str]:
    """JSON pointer (under `prefix`) -> template string, for each string of `template` that holds secrets."""
    found: dict[str, str] = {}
    todo: list[tuple[str, Any]] = [(prefix, template)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, str):
            if holds_secrets(value):
                found[where] = value
        elif isinstance(value, dict):
            todo.extend((f"{where}/{_escape(str(k))}", v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{where}/{i}", v) for i, v in enumerate(value))
    return found


def substitute(text: str, lookup: Callable[[str], str]) -> str:
    """Replace each `${{ secrets.NAME }}` of `text` by `lookup(NAME)`."""

    def one(match: re.Match[str]) -> str:
        name = reference(match.group(1))
        return lookup(name) if name is not None else match.group(0)

    return _PART.sub(one, text)


def set_at(document: dict[str, Any], pointer: str, value: Any) -> bool:
    """Set `value` at a JSON pointer of `document`, in place; False if the place no longer exists."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    if not parts:
        return False
    node: Any = document
    for part in parts[:-1]:
        node = _child(node, part)
        if node is None:
            return False
    last = parts[-1]
    if isinstance(node, dict) and last in node:
        node[last] = value
        return True
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
        return True
    return False


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


def problems(template: Any) -> list[str]:
    """What is wrong with the secret references of a `with:` or `input:` template (empty: nothing)."""
    out: list[str] = []
    todo: list[Any] = [template]
    count = 0
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
        elif isinstance(value, str) and "secrets" in value:
            inside = [m.group(1) for m in _PART.finditer(value)]
            if not any(mentions_secrets(e) for e in inside):
                continue
            for expr in inside:
                if mentions_secrets(expr) and reference(expr) is None:
                    out.append(f"{expr.strip()!r}: a secret is referenced as ${{{{ secrets.NAME }}}} "
                               "and cannot be used inside another expression")
                elif reference(expr) is None:
                    out.append(f"{value[:120]!r}: a string with a secret may hold only secrets and plain text, "
                               f"not ${{{{{expr}}}}}")
                else:
                    count += 1
    if count > MAX_REFERENCES:
        out.append(f"more than {MAX_REFERENCES} secret references")
    return out
