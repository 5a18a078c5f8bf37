"""Workflow definitions: the shape DESIGN.md fixes, validated before anything is stored.

`parse_definition(text)` reads YAML or JSON and returns a `WorkflowDef`, or raises
`DefinitionError` whose `problems` each name the field (`steps[1].needs`) and,
for YAML/JSON text, the line it sits on.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
import re
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jsonschema
import orjson
import yaml
from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contracts import secrets
from contracts.expressions import ExpressionError, check_template, expressions_in
from contracts.values import MAX_DEPTH, ValueProblem, check_value

BUILTIN_STEP_TYPES: frozenset[str] = frozenset({"python", "transform", "sleep", "noop", "http"})
STEP_ID = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# Not preceded by a name or a dot: `input.steps.x` is a field of the input, not a step.
_STEP_REF = re.compile(r"(?<![\w.])steps\.([A-Za-z_][A-Za-z0-9_]*)")
MAX_DEFINITION_ELEMENTS = 200_000  # values in one definition, YAML aliases expanded
_EXPR_ONLY = re.compile(r"^\s*\$\{\{.*\}\}\s*$", re.DOTALL)


class Problem(BaseModel):
    """One thing wrong with a definition: where, and why."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path} (line {self.line})" if self.line else self.path
        return f"{where}: {self.message}"


class DefinitionError(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("invalid workflow definition:\n" + "\n".join(f"  {p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class RetryPolicy(_Strict):
    max_attempts: int = Field(3, ge=1, le=100)
    initial_delay: float = Field(1.0, ge=0, le=86_400)
    max_delay: float = Field(60.0, ge=0, le=86_400)
    multiplier: float = Field(2.0, ge=1, le=100)
    jitter: bool = True
    non_retryable: tuple[str, ...] = ()  # error type names that stop the retries


class WebhookSpec(_Strict):
    path: str = Field(pattern=r"^/[A-Za-z0-9/_.-]*$")
    secret_env: str | None = None


class TriggerSpec(_Strict):
    """One entry of `on:`: an event type, a webhook or a cron schedule."""

    event: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
    filter: dict[str, Any] | None = None
    webhook: WebhookSpec | None = None
    cron: str | None = None
    timezone: str = "UTC"
    missed: Literal["skip", "catch_up"] = "skip"
    catch_up_limit: int = Field(1, ge=0, le=1000)

    @model_validator(mode="after")
    def _one_kind(self) -> TriggerSpec:
        kinds = [k for k in ("event", "webhook", "cron") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("each trigger needs exactly one of 'event', 'webhook' or 'cron'")
        return self


class StepDef(_Strict):
    id: str = Field(pattern=STEP_ID)
    type: str = Field(min_length=1, max_length=64)
    needs: tuple[str, ...] = ()
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    input: Any = None
    when: str | None = None
    map: str | None = None
    retry: RetryPolicy = RetryPolicy()
    timeout: float | None = Field(None, gt=0, le=7 * 86_400)

    @field_validator("when", "map")
    @classmethod
    def _is_expression(cls, value: str | None) -> str | None:
        # count: "${{ a }} and ${{ b }}" matches _EXPR_ONLY but is two expressions
        if value is not None and (not _EXPR_ONLY.match(value) or value.count("${{") != 1):
            raise ValueError("must be one '${{ expression }}'")
        return value

    @cached_property
    def secret_refs(self) -> dict[str, str]:
        """Where this step's `with:` and `input:` hold secret references: JSON pointer -> template."""
        found = secrets.locate(self.with_, "/config")
        if self.input is not None:
            found.update(secrets.locate(self.input, "/input"))
        return found


class WorkflowDef(_Strict):
    name: str = Field(pattern=NAME)
    description: str | None = None
    on: tuple[TriggerSpec, ...] = ()
    input_schema: dict[str, Any] | None = None
    steps: tuple[StepDef, ...] = Field(min_length=1, max_length=500)
    output: Any = None

    def step(self, step_id: str) -> StepDef:
        return self.steps_by_id[step_id]

    # A definition is immutable, so what is derived from it is computed once.
    @cached_property
    def steps_by_id(self) -> dict[str, StepDef]:
        return {s.id: s for s in self.steps}

    @cached_property
    def input_validator(self) -> jsonschema.Draft202012Validator | None:
        return jsonschema.Draft202012Validator(self.input_schema) if self.input_schema is not None else None

    def children(self, step_id: str) -> list[str]:
        return [s.id for s in self.steps if step_id in s.needs]

    def downstream(self, step_id: str) -> set[str]:
        """The step and every step that depends on it, transitively."""
        out, todo = {step_id}, [step_id]
        while todo:
            for child in self.children(todo.pop()):
                if child not in out:
                    out.add(child)
                    todo.append(child)
        return out

    def canonical(self) -> dict[str, Any]:
        """The definition as stored and hashed (shared: do not modify it)."""
        return self._canonical

    @cached_property
    def _canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)

    def content_hash(self) -> str:
        body = orjson.dumps(self.canonical(), option=orjson.OPT_SORT_KEYS)
        return "sha256:" + hashlib.sha256(body).hexdigest()


def check_rules(wf: WorkflowDef, step_types: frozenset[str] | set[str] = BUILTIN_STEP_TYPES) -> list[Problem]:
    """Rules that need the whole definition: schedules, ids, needs, cycles, expressions, schema."""
    return _check_schedules(wf) + _check_steps(wf, step_types)


def _check_steps(wf: WorkflowDef, step_types: frozenset[str] | set[str]) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, step in enumerate(wf.steps):
        if step.id in seen:
            problems.append(Problem(path=f"steps[{i}].id", message=f"duplicate step id {step.id!r}"))
        seen.setdefault(step.id, i)
    for i, step in enumerate(wf.steps):
        where = f"steps[{i}]"
        if step.type not in step_types:
            known = ", ".join(sorted(step_types))
            problems.append(Problem(path=f"{where}.type", message=f"unknown step type {step.type!r} (known: {known})"))
        for j, parent in enumerate(step.needs):
            if parent not in seen:
                problems.append(Problem(path=f"{where}.needs[{j}]", message=f"unknown step {parent!r}"))
            elif parent == step.id:
                problems.append(Problem(path=f"{where}.needs[{j}]", message="a step cannot need itself"))
    problems.extend(_cycles(wf, seen))
    if problems:
        return problems
    for i, step in enumerate(wf.steps):
        upstream = _ancestors(wf, step.id)
        for field, template in (("input", step.input), ("when", step.when), ("map", step.map), ("with", step.with_)):
            problems.extend(_check_expressions(f"steps[{i}].{field}", template, upstream, step.id))
    problems.extend(_check_expressions("output", wf.output, set(seen), None))
    problems.extend(_check_secrets(wf))
    if wf.input_schema is not None:
        try:
            jsonschema.Draft202012Validator.check_schema(wf.input_schema)
        except jsonschema.SchemaError as exc:
            problems.append(Problem(path="input_schema", message=exc.message))
    return problems


def _check_secrets(wf: WorkflowDef) -> list[Problem]:
    """Secrets only as `${{ secrets.NAME }}` in with:/input:, and credentials only as secrets."""
    problems: list[Problem] = []
    for i, step in enumerate(wf.steps):
        for field, template in (("with", step.with_), ("input", step.input)):
            problems.extend(Problem(path=f"steps[{i}].{field}", message=m) for m in secrets.problems(template))
        for field, template in (("when", step.when), ("map", step.map)):
            if template is not None and any(secrets.mentions_secrets(e) for e in expressions_in(template)):
                problems.append(Problem(path=f"steps[{i}].{field}", message="secrets can be used only in with: "
                                        "and input:, where the worker resolves them"))
        if step.type == "http":
            problems.extend(_credential_problems(i, step))
    if any(secrets.mentions_secrets(e) for e in expressions_in(wf.output)):
        problems.append(Problem(path="output", message="secrets can be used only in a step's with: and input:"))
    return problems


def _credential_problems(i: int, step: StepDef) -> list[Problem]:
    out: list[Problem] = []
    url = step.with_.get("url")
    if isinstance(url, str) and secrets.holds_secrets(url):
        # A URL is logged (httpx logs each request) and shown in errors: secrets go in headers or auth.
        out.append(Problem(path=f"steps[{i}].with.url", message="a secret cannot be part of the URL, which is "
                           "logged and shown in errors: send it in a header or auth, e.g. "
                           "headers: {X-API-Key: \"${{ secrets.API_KEY }}\"}"))
    places = [(f"steps[{i}].with.headers", step.with_.get("headers"))]
    if isinstance(step.input, dict):
        places.append((f"steps[{i}].input.headers", step.input.get("headers")))
    for where, headers in places:
        if not isinstance(headers, dict):
            continue
        for name, value in headers.items():
            if str(name).lower() not in secrets.CREDENTIAL_HEADERS:
                continue
            if not isinstance(value, str) or not secrets.names_in(value):
                example = "Bearer ${{ secrets.API_TOKEN }}" if str(name).lower() == "authorization" else (
                    "${{ secrets.API_KEY }}")
                out.append(Problem(path=f"{where}.{name}", message=(
                    f"the {name} header holds a credential and must come from a secret, which the worker "
                    f"resolves from its environment or secrets folder: {name}: \"{example}\"")))
    return out


def _check_schedules(wf: WorkflowDef) -> list[Problem]:
    """Cron expressions (5 fields, or 6 with seconds last) and time zones the scheduler can compute."""
    problems = []
    for i, spec in enumerate(wf.on):
        if spec.cron is None:
            continue
        if not croniter.is_valid(spec.cron):
            problems.append(Problem(path=f"on[{i}].cron", message=f"not a cron expression: {spec.cron!r}"))
        try:
            ZoneInfo(spec.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(Problem(path=f"on[{i}].timezone", message=f"unknown time zone {spec.timezone!r}"))
    return problems


def _check_expressions(path: str, template: Any, allowed: set[str], own: str | None) -> list[Problem]:
    out: list[Problem] = []
    try:
        check_template(template, path)
    except ExpressionError as exc:  # its length, nesting and syntax, in the field it sits in
        return [Problem(path=exc.path or path, message=str(exc))]
    for expr in expressions_in(template):
        for ref in _STEP_REF.findall(expr):
            if ref not in allowed:
                why = "is not upstream of this step (add it to needs)" if own else "is not a step"
                out.append(Problem(path=path, message=f"expression refers to steps.{ref}, which {why}"))
    return out


def _ancestors(wf: WorkflowDef, step_id: str) -> set[str]:
    index = {s.id: s for s in wf.steps}
    out: set[str] = set()
    todo = list(index[step_id].needs)
    while todo:
        sid = todo.pop()
        if sid not in out and sid in index:
            out.add(sid)
            todo.extend(index[sid].needs)
    return out


def _cycles(wf: WorkflowDef, index: dict[str, int]) -> list[Problem]:
    graph = {s.id: [p for p in s.needs if p in index and p != s.id] for s in wf.steps}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for root in graph:
        if state.get(root):
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = []
        while stack:
            node, i = stack.pop()
            if i == 0:
                state[node] = 1
                path.append(node)
            parents = graph[node]
            if i < len(parents):
                stack.append((node, i + 1))
                nxt = parents[i]
                if state.get(nxt) == 1:
                    cycle = path[path.index(nxt):] + [nxt]
                    msg = "cycle: " + " -> ".join(reversed(cycle))
                    return [Problem(path=f"steps[{index[node]}].needs", message=msg)]
                if not state.get(nxt):
                    stack.append((nxt, 0))
            else:
                state[node] = 2
                path.pop()
    return []


# ---- parsing with line numbers ---------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 reads the key `on:` as True."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_definition(
    source: str | bytes | dict[str, Any], step_types: frozenset[str] | set[str] = BUILTIN_STEP_TYPES
) -> WorkflowDef:
    """YAML/JSON text (or an already-parsed mapping) to a checked WorkflowDef."""
    lines: dict[tuple[Any, ...], int] = {}
    if isinstance(source, dict):
        data: Any = source
    else:
        text = source.decode() if isinstance(source, bytes) else source
        try:
            _check_yaml_depth(text)  # the YAML composer and _index_lines recurse once per level
            node = yaml.compose(text, Loader=_Loader)
            data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            # PyYAML's whole message, without its source snippets: "while parsing a flow mapping
            # (line 3, column 5): expected ',' or '}', but got '<stream end>'".
            detail = str(getattr(exc, "problem", None) or str(exc).splitlines()[0])
            context, where = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            if context:
                at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
                detail = f"{context}{at}: {detail}"
            raise DefinitionError([Problem(path="<document>", message=detail, line=line)]) from None
        if node is not None:
            _index_lines(node, (), lines)
    if not isinstance(data, dict):
        raise DefinitionError([Problem(path="<document>", message="a definition must be a mapping")])
    try:
        # What the store and orjson cannot carry (a 65-bit integer, a lone surrogate, NaN), and YAML
        # aliases that would expand to more than MAX_DEFINITION_ELEMENTS, before pydantic walks it.
        check_value(data, "", max_elements=MAX_DEFINITION_ELEMENTS)
    except ValueProblem as exc:
        path = exc.path or "<document>"
        raise DefinitionError([Problem(path=path, message=exc.message, line=_line(lines, _loc(path)))]) from None
    try:
        wf = WorkflowDef.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            if loc == ("steps",) and err["type"] == "too_short" and data.get("steps"):
                continue  # pydantic counts only the valid steps; each invalid one has its own error
            problems.append(Problem(path=_path(loc), message=err["msg"], line=_line(lines, loc)))
        raise DefinitionError(problems) from None
    problems = check_rules(wf, step_types)
    if problems:
        for p in problems:
            p.line = _line(lines, _loc(p.path))
        raise DefinitionError(problems)
    return wf


def _check_yaml_depth(text: str) -> None:
    """Depth and size of the document with its aliases expanded (as _index_lines and pydantic would
    walk it), counted from yaml.parse's events: a state machine, no recursion, nothing expanded."""
    open_: list[list[Any]] = [[None, 0, 0]]  # per open collection: anchor, elements, depth below it
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (elements, depth)

    def problem(event: Any, message: str) -> DefinitionError:
        return DefinitionError([Problem(path="<document>", message=message, line=event.start_mark.line + 1)])

    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            open_.append([event.anchor, 0, 0])
            if len(open_) - 1 > MAX_DEPTH:
                raise problem(event, f"nested deeper than {MAX_DEPTH} levels")
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, elements, depth = open_.pop()
            elements, depth = elements + 1, depth + 1
            if anchor is not None:
                sizes[anchor] = (elements, depth)
        elif isinstance(event, yaml.ScalarEvent):
            elements, depth = 1, 0
            if event.anchor is not None:
                sizes[event.anchor] = (1, 0)
        elif isinstance(event, yaml.AliasEvent):
            elements, depth = sizes.get(event.anchor, (1, 0)) if event.anchor is not None else (1, 0)
        else:
            continue
        parent = open_[-1]
        parent[1] += elements
        parent[2] = max(parent[2], depth)
        if len(open_) - 1 + depth > MAX_DEPTH:
            raise problem(event, f"nested deeper than {MAX_DEPTH} levels (with its aliases expanded)")
        if sum(level[1] for level in open_) > MAX_DEFINITION_ELEMENTS:
            raise problem(event, f"more than {MAX_DEFINITION_ELEMENTS} values (with its aliases expanded)")


def _index_lines(node: yaml.Node, loc: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _index_lines(value, loc + (key.value,), out)
            out[loc + (key.value,)] = key.start_mark.line + 1  # a field's line is its key's
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _index_lines(value, loc + (i,), out)


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<document>"


def _loc(path: str) -> tuple[Any, ...]:
    parts: list[Any] = []
    for name, index in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", path):
        parts.append(int(index) if index else name)
    return tuple(parts)


def _line(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def validate_input(wf: WorkflowDef, value: Any) -> list[Problem]:
    """Problems of an execution input: what Weft cannot carry (contracts.values), then the input_schema.
    Every way of starting an execution (HTTP, CLI, triggers, cron, replays) comes through here."""
    try:
        check_value(value, "input")
    except ValueProblem as exc:
        return [Problem(path=exc.path, message=exc.message)]
    validator = wf.input_validator
    if validator is None:
        return []
    problems = []
    for err in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
        path = "input" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        problems.append(Problem(path=path, message=err.message))
    return problems
