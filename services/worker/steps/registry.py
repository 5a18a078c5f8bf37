"""The step-type registry, the handler protocol and the errors every step type shares."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from weft.steps import NonRetryableError, StepContext

__all__ = [
    "StepHandler",
    "ConfigValidator",
    "StepRegistry",
    "StepTypeError",
    "UnknownStepTypeError",
    "StepInputError",
    "is_template",
    "check_keys",
    "config_error",
]

# Subjects are `weft.steps.<type>`; keep names to one readable token.
_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


class StepHandler(Protocol):
    """What the worker calls for one task of a step."""

    async def __call__(self, input: Any, config: Mapping[str, Any], ctx: StepContext) -> Any: ...


@runtime_checkable
class ConfigValidator(Protocol):
    """A handler that can check its `with:` config before a definition is stored (optional)."""

    def validate_config(self, config: Mapping[str, Any]) -> None: ...


class StepTypeError(Exception):
    """Root error of this package: a step type, or its `with:` config, is wrong.

    `field` names the offending key of `with:` (None when the whole config, or
    the type itself, is wrong). Marked non-retryable: a bad config does not get
    better by retrying it.
    """

    non_retryable = True

    def __init__(self, message: str, *, type_name: str = "", field: str | None = None):
        super().__init__(message)
        self.message = message
        self.type_name = type_name
        self.field = field

    def __str__(self) -> str:
        return self.message


class UnknownStepTypeError(StepTypeError, KeyError):
    """No handler is registered under this type name (also a KeyError)."""

    def __init__(self, type_name: str, known: Iterable[str]):
        known_list = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"unknown step type {type_name!r} (known: {known_list})", type_name=type_name, field="type"
        )


class StepInputError(NonRetryableError):
    """A step's resolved input does not have the shape its type needs."""

    def __init__(self, type_name: str, field: str, reason: str):
        where = f"input.{field}" if field else "input"
        super().__init__(f"{type_name} step: {where}: {reason}")
        self.type_name = type_name
        self.field = field
        self.reason = reason


def config_error(type_name: str, field: str | None, reason: str) -> StepTypeError:
    where = f"with.{field}: " if field else "with: "
    return StepTypeError(f"{type_name} step: {where}{reason}", type_name=type_name, field=field)


def is_template(value: Any) -> bool:
    """A `${{ }}` string: its value is only known at run time, so static checks skip it."""
    return isinstance(value, str) and "${{" in value


def check_keys(type_name: str, config: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Refuse keys a type does not know: a typo (`urll`) should fail at publish, not at 3 a.m."""
    allowed = tuple(allowed)
    for key in config:
        if key not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise config_error(type_name, str(key), f"unknown field (known: {known})")


class StepRegistry:
    """Step type name -> handler. Built at the worker's entry point; no global instance."""

    def __init__(self) -> None:
        self._handlers: dict[str, StepHandler] = {}

    def register(self, type_name: str, handler: StepHandler, *, replace: bool = False) -> None:
        if not isinstance(type_name, str) or not _TYPE_NAME.match(type_name):
            raise StepTypeError(
                f"bad step type name {type_name!r}: a letter, then up to 63 letters, digits, '_', '.' or '-'",
                type_name=str(type_name),
                field="type",
            )
        if not callable(handler):
            raise StepTypeError(f"handler for step type {type_name!r} is not callable", type_name=type_name)
        if type_name in self._handlers and not replace:
            raise StepTypeError(
                f"step type {type_name!r} is already registered (pass replace=True to override it)",
                type_name=type_name,
                field="type",
            )
        self._handlers[type_name] = handler

    def get(self, type_name: str) -> StepHandler:
        try:
            return self._handlers[type_name]
        except (KeyError, TypeError):
            raise UnknownStepTypeError(str(type_name), self._handlers) from None

    def names(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._handlers

    def validate_config(self, type_name: str, config: Mapping[str, Any]) -> None:
        """Raise StepTypeError (naming the field) if `config` is not a valid `with:` for the type.

        Handlers that have a `validate_config(config)` method get it called;
        others accept any mapping.
        """
        handler = self.get(type_name)
        if not isinstance(config, Mapping):
            raise config_error(type_name, None, f"must be a mapping, not {type(config).__name__}")
        if isinstance(handler, ConfigValidator):
            handler.validate_config(config)
