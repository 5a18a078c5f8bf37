"""Code-first workflows: decorated Python functions that compile to the definition YAML gives.

    from weft import Workflow, StepContext

    orders = Workflow("order-fulfilment", input_schema=OrderIn, on=["order.created"])

    @orders.step(retry={"max_attempts": 3}, timeout=30)
    async def reserve(input: OrderIn, ctx: StepContext) -> Reservation: ...

    @orders.step(needs=[reserve], map=output_of(reserve).items)
    def ship(item: str, ctx: StepContext) -> Parcel: ...

A decorated function becomes a `python` step whose `callable` is
`module:function`, so the worker's step-module allowlist covers it, and the
definition (`orders.definition()`) is a `contracts.definitions.WorkflowDef`
checked by the same `parse_definition` as YAML: the same content hashes the
same, however it was written.

The decorator returns a wrapper with the function's name and module: it is
what the worker imports from the `callable` path. The wrapper parses the input
with the first parameter's annotation (pydantic `TypeAdapter`) and serializes
the return value with the return annotation, on the worker; the JSON Schemas of
both go into the step's `with:` as `input_schema` / `output_schema`.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from weft.steps import NonRetryableError

__all__ = ["Workflow", "Expr", "input_", "output_of", "item", "StepInputInvalid", "StepOutputInvalid"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")


class StepInputInvalid(NonRetryableError):
    """The step's input does not parse as its annotated type (the same input fails every time)."""


class StepOutputInvalid(NonRetryableError):
    """The step returned something its return annotation does not accept."""


# ---- expression helpers -------------------------------------------------------------------------


class Expr(str):
    """A `${{ path }}` expression that grows by attribute or item access:
    `output_of(reserve).items` is the string "${{ steps.reserve.output.items }}".
    Names that are also `str` methods (`count`, `index`) go through `[...]`."""

    path: str

    def __new__(cls, path: str) -> Expr:
        self = super().__new__(cls, "${{ " + path + " }}")
        self.path = path
        return self

    def __getattr__(self, name: str) -> Expr:
        if name.startswith("__"):
            raise AttributeError(name)
        return Expr(f"{self.path}.{name}")

    def __getitem__(self, key: Any) -> Expr:  # type: ignore[override]
        if isinstance(key, int):
            return Expr(f"{self.path}[{key}]")
        if isinstance(key, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            return Expr(f"{self.path}.{key}")
        raise KeyError(f"{key!r}: use an integer index or a plain field name")


input_ = Expr("input")
item = Expr("item")


def output_of(step: Any) -> Expr:
    """`${{ steps.<id>.output }}` of a decorated step function (or a step id)."""
    return Expr(f"steps.{_step_id(step)}.output")


# ---- the workflow ---------------------------------------------------------------------------------


def _step_id(step: Any) -> str:
    if isinstance(step, str):
        return step
    sid = getattr(step, "__weft_step__", None)
    if isinstance(sid, str):
        return sid
    raise TypeError(f"needs: {step!r} is neither a step id nor a function decorated with @workflow.step")


def _schema_of(model: Any) -> dict[str, Any] | None:
    if model is None or isinstance(model, dict):
        return model
    from pydantic import TypeAdapter

    return TypeAdapter(model).json_schema()


def _adapter(annotation: Any) -> Any:
    """A TypeAdapter for an annotation that says something; None for none, Any, or a plain JSON object
    (`dict`, `dict[str, Any]`): those are passed through as they are, with no schema recorded."""
    if annotation in (inspect.Parameter.empty, Any, dict, None, type(None), object):
        return None
    if typing.get_origin(annotation) is dict and typing.get_args(annotation) == (str, Any):
        return None
    from pydantic import TypeAdapter

    return TypeAdapter(annotation)


class Workflow:
    """A workflow built in Python. `definition()` compiles it (and checks it, as YAML is checked)."""

    def __init__(self, name: str, *, input_schema: Any = None, on: Iterable[str | Mapping[str, Any]] = (),
                 description: str | None = None, output: Any = None):
        self.name = name
        self.input_schema = input_schema
        self.on = [{"event": t} if isinstance(t, str) else dict(t) for t in on]
        self.description = description
        self.output = output  # a template: "${{ steps.x.output }}", or a mapping of them
        self._steps: list[dict[str, Any]] = []
        self.functions: dict[str, Callable[..., Any]] = {}  # step id -> the wrapper the worker calls

    # ---- building --------------------------------------------------------------------------------

    def step(self, fn: Callable[..., Any] | None = None, *, id: str | None = None, needs: Iterable[Any] = (),
             input: Any = None, map: str | None = None, when: str | None = None,
             retry: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Decorate `fn(input, ctx)` (or `fn(input)`) as a `python` step of this workflow."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            path = _callable_path(fn)
            sid = id or fn.__name__
            wrapper, schemas = _wrap(fn, sid)
            self._add({"id": sid, "type": "python", "needs": needs, "with": {"callable": path, **schemas},
                       "input": input, "map": map, "when": when, "retry": retry, "timeout": timeout})
            self.functions[sid] = wrapper
            return wrapper

        return decorate(fn) if fn is not None else decorate

    def add(self, id: str, type: str, *, config: Mapping[str, Any] | None = None, needs: Iterable[Any] = (),
            input: Any = None, map: str | None = None, when: str | None = None,
            retry: Mapping[str, Any] | None = None, timeout: float | None = None) -> str:
        """A step of any other type (transform, http, sleep, noop); `config` is its `with:`. Returns its id,
        which `needs=` and `output_of` take."""
        self._add({"id": id, "type": type, "needs": needs, "with": dict(config or {}), "input": input, "map": map,
                   "when": when, "retry": retry, "timeout": timeout})
        return id

    def transform(self, id: str, expression: str, **kw: Any) -> str:
        """A `transform` step: a JMESPath `expression` over its input."""
        return self.add(id, "transform", config={"expression": expression}, **kw)

    def _add(self, spec: dict[str, Any]) -> None:
        if any(s["id"] == spec["id"] for s in self._steps):
            raise ValueError(f"workflow {self.name!r} already has a step {spec['id']!r}")
        spec["needs"] = [_step_id(n) for n in spec["needs"]]
        self._steps.append(spec)
        self.__dict__.pop("_compiled", None)

    # ---- compiling --------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """The definition as YAML would spell it (only the fields that were given)."""
        steps = []
        for i, spec in enumerate(self._steps):
            step = {k: v for k, v in spec.items() if v not in (None, [], {})}
            if spec["with"]:
                step["with"] = spec["with"]
            if isinstance(step.get("retry"), Mapping):
                step["retry"] = dict(step["retry"])
            steps.append(_plain(step, f"steps[{i}]"))
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.on:
            out["on"] = self.on
        schema = _schema_of(self.input_schema)
        if schema is not None:
            out["input_schema"] = schema
        out["steps"] = steps
        if self.output is not None:
            out["output"] = _plain(self.output, "output")
        return out

    def definition(self) -> Any:
        """The checked `WorkflowDef`; raises `contracts.definitions.DefinitionError` naming each problem."""
        compiled = self.__dict__.get("_compiled")
        if compiled is None:
            from contracts.definitions import parse_definition

            compiled = self.__dict__["_compiled"] = parse_definition(self.as_dict())
        return compiled

    def content_hash(self) -> str:
        return self.definition().content_hash()

    def to_yaml(self) -> str:
        """The compiled definition as YAML (`weft workflows show module:attr` prints it)."""
        import yaml

        return yaml.safe_dump(self.definition().canonical(), sort_keys=False, allow_unicode=True)

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, steps={[s['id'] for s in self._steps]})"


def _plain(value: Any, path: str = "", depth: int = 0) -> Any:
    """Expr and other str subclasses as plain str: what is hashed is plain JSON. Bounded in depth
    (as parse_definition bounds YAML) so a hostile template is a DefinitionError, not a RecursionError."""
    from contracts.values import MAX_DEPTH

    if depth > MAX_DEPTH:
        from contracts.definitions import DefinitionError, Problem

        raise DefinitionError([Problem(path=path or "<document>", message=f"nested deeper than {MAX_DEPTH} levels")])
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, path, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, path, depth + 1) for v in value]
    return value


def _callable_path(fn: Callable[..., Any]) -> str:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module == "__main__":  # `python -m pkg.mod`: the name the worker imports it by
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = getattr(spec, "name", None) or module
    if module in (None, "__main__"):
        raise ValueError(f"step {qualname!r} is defined in __main__: define steps in an importable module "
                         "(the worker imports them by `module:function`)")
    if not _IDENT.match(module) or not _IDENT.match(qualname):
        raise ValueError(f"step {module}:{qualname} must be a module-level function (the worker imports it "
                         "by `module:function`)")
    return f"{module}:{qualname}"


def _wrap(fn: Callable[..., Any], step_id: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The function the worker calls: parse the input, call `fn`, serialize its result."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if not 1 <= len(params) <= 2:
        raise TypeError(f"step {step_id!r}: a step function takes (input, ctx) or (input), not {sig}")
    try:
        hints = typing.get_type_hints(fn, globalns=vars(sys.modules.get(fn.__module__, object())))
    except Exception as exc:  # a forward reference that does not resolve
        raise TypeError(f"step {step_id!r}: cannot resolve its type hints: {exc}") from exc
    in_adapter = _adapter(hints.get(params[0].name, inspect.Parameter.empty))
    out_adapter = _adapter(hints.get("return", inspect.Parameter.empty))
    with_ctx = len(params) == 2
    schemas: dict[str, Any] = {}
    if in_adapter is not None:
        schemas["input_schema"] = in_adapter.json_schema()
    if out_adapter is not None:
        schemas["output_schema"] = out_adapter.json_schema(mode="serialization")

    def parse(value: Any) -> Any:
        if in_adapter is None:
            return value
        from pydantic import ValidationError

        try:
            return in_adapter.validate_python(value)
        except ValidationError as exc:
            raise StepInputInvalid(f"step {step_id!r}: input does not match its type: {exc}") from None

    def serialize(value: Any) -> Any:
        if out_adapter is None:
            return value
        from pydantic import ValidationError

        try:
            return out_adapter.dump_python(out_adapter.validate_python(value), mode="json")
        except ValidationError as exc:
            raise StepOutputInvalid(f"step {step_id!r}: its return value does not match its type: {exc}") from None

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run(input: Any, ctx: Any = None) -> Any:
            args = (parse(input), ctx) if with_ctx else (parse(input),)
            return serialize(await fn(*args))
    else:
        @functools.wraps(fn)
        def run(input: Any, ctx: Any = None) -> Any:  # type: ignore[misc]
            args = (parse(input), ctx) if with_ctx else (parse(input),)
            return serialize(fn(*args))

    run.__weft_step__ = step_id  # type: ignore[attr-defined]
    signature = inspect.Signature([inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                   inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)])
    run.__signature__ = signature  # type: ignore[attr-defined]
    return run, schemas


def load(target: str) -> Workflow:
    """`package.module:attr` -> the Workflow it names (for `weft workflows publish|show`)."""
    import importlib

    module_name, _, attr = target.partition(":")
    if not attr or not _IDENT.match(module_name) or not _IDENT.match(attr):
        raise ValueError(f"{target!r} is not of the form 'package.module:workflow'")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the working directory's modules import
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{module_name!r} has no attribute {attr!r}")
    if not isinstance(obj, Workflow):
        raise ValueError(f"{target} is a {type(obj).__name__}, not a weft.Workflow")
    return obj
