"""`python` steps: call `package.module:function` with `(input, ctx)`.

    with: {callable: "shop.steps:reserve"}

Only modules on the worker's allowlist (`allowlist.py`, `WEFT_STEP_MODULES`)
are imported: anything else fails with `CallableNotAllowed` before an import
happens. The callable is imported once per handler and cached. Sync callables run in a
worker thread (`asyncio.to_thread`) so a slow one does not stall the event
loop; async callables are awaited. The return value must be JSON-serialisable
(checked with orjson); the handler returns it *normalised* through orjson, so
tuples become lists, dataclasses and datetimes their JSON forms, and what the
worker stores is plain JSON. Exceptions from the callable propagate unchanged:
the worker turns them into a failed result.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from services.worker.steps.allowlist import CallableNotAllowed, StepModules
from services.worker.steps.registry import check_keys, config_error, is_template
from weft.steps import NonRetryableError, StepContext

__all__ = ["PythonStep", "CallableImportError", "CallableNotAllowed", "OutputNotJSONError", "CALLABLE_PATH"]

TYPE = "python"
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
CALLABLE_PATH = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*$")


class CallableImportError(NonRetryableError):
    """The `callable` path does not import, or does not name a callable."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"python step: cannot load callable {path!r}: {reason}")
        self.path = path
        self.reason = reason


class OutputNotJSONError(NonRetryableError):
    """The callable returned something that is not JSON-serialisable."""

    def __init__(self, path: str, value_type: str, reason: str):
        super().__init__(
            f"python step: {path!r} returned a {value_type} that is not JSON-serialisable: {reason}"
        )
        self.path = path
        self.value_type = value_type
        self.reason = reason


def _load(path: str, modules: StepModules) -> Callable[..., Any]:
    if not CALLABLE_PATH.match(path):
        raise CallableImportError(path, "not of the form 'package.module:function'")
    modules.check_path(path)  # before the import: importing a module runs its code
    module_name, _, attr_path = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # SyntaxError and friends too: the message must say which path
        raise CallableImportError(path, f"{type(exc).__name__}: {exc}") from exc
    via: list[Any] = []
    for part in attr_path.split("."):
        via.append(obj)
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CallableImportError(path, f"{module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise CallableImportError(path, f"{type(obj).__name__} object is not callable")
    modules.check_target(path, obj, via[1:])
    return obj


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or callable(fn) and inspect.iscoroutinefunction(fn.__call__)


def _json_normalised(path: str, value: Any) -> Any:
    try:
        return orjson.loads(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise OutputNotJSONError(path, type(value).__name__, str(exc)) from None


class PythonStep:
    def __init__(self, modules: StepModules | None = None) -> None:
        # No allowlist given: nothing is callable. A worker is built with its operator's list.
        self.modules = modules if modules is not None else StepModules()
        # Path -> callable. Concurrent first calls may both import: harmless,
        # the module system makes the second import a dictionary lookup.
        self._cache: dict[str, Callable[..., Any]] = {}

    def validate_config(self, config: Mapping[str, Any]) -> None:
        # The schemas a code-first step (weft.Workflow) records: its wrapper parses with them.
        check_keys(TYPE, config, ("callable", "input_schema", "output_schema"))
        if "callable" not in config:
            raise config_error(TYPE, "callable", "required, e.g. 'package.module:function'")
        path = config["callable"]
        if is_template(path):
            return
        if not isinstance(path, str):
            raise config_error(TYPE, "callable", f"must be a string, not {type(path).__name__}")
        if not CALLABLE_PATH.match(path):
            raise config_error(TYPE, "callable", f"{path!r} is not of the form 'package.module:function'")

    async def resolve(self, path: str) -> Callable[..., Any]:
        fn = self._cache.get(path)
        if fn is None:
            # Importing can run arbitrary module code: keep it off the event loop.
            fn = await asyncio.to_thread(_load, path, self.modules)
            self._cache[path] = fn
        return fn

    async def __call__(self, input: Any, config: Mapping[str, Any], ctx: StepContext) -> Any:
        self.validate_config(config)
        path: str = config["callable"]
        fn = await self.resolve(path)
        if _is_async(fn):
            result = await fn(input, ctx)
        else:
            result = await asyncio.to_thread(fn, input, ctx)
            if inspect.isawaitable(result):  # a sync wrapper that hands back a coroutine
                result = await result
        return _json_normalised(path, result)
