"""`/v1/workflows`: publish (immutable, content-hashed versions), list, get."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Path, Request, Response

from contracts.definitions import NAME, DefinitionError, parse_definition
from services.gateway.auth import ScopedRoute, caller, scoped
from services.gateway.errors import ApiError, errors, invalid
from services.gateway.keys import trigger_names
from services.gateway.models import WorkflowList, WorkflowVersionOut
from services.orchestrator.registry import UnknownWorkflow, Version

log = logging.getLogger("weft.gateway")

router = APIRouter(prefix="/v1/workflows", tags=["workflows"], route_class=ScopedRoute)
NamePath = Path(min_length=1, max_length=128, description="workflow name")

_DEFINITION_SCHEMA = {
    "type": "object",
    "description": "A workflow definition (see DESIGN.md: name, on, input_schema, steps, output)",
    "required": ["name", "steps"],
    "properties": {
        "name": {"type": "string", "pattern": NAME},
        "steps": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "type"],
            "properties": {"id": {"type": "string"}, "type": {"type": "string"}}}},
    },
}
_PUBLISH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _DEFINITION_SCHEMA},
            "application/yaml": {"schema": {"type": "string", "description": "the definition as YAML"}},
        },
    }
}


def out(v: Version, *, definition: bool = False, created: bool | None = None) -> dict[str, Any]:
    return {
        "id": f"{v.name}@{v.version}", "workflow": v.name, "version": v.version, "content_hash": v.content_hash,
        "published_at": v.published_at, "created": created,
        "definition": v.definition.canonical() if definition else None,
    }


# The body is read raw (YAML or JSON, with line numbers in errors), so the route takes the
# Request; FastAPI's own body parsing would reject YAML before we could explain why.
@router.post("", status_code=201, response_model=WorkflowVersionOut, responses={**errors(), 200: {
    "model": WorkflowVersionOut, "description": "Identical content was already published: that version"}},
    openapi_extra={**scoped("admin"), **_PUBLISH_BODY})
async def publish_workflow(request: Request, response: Response) -> Any:
    """Register a version (YAML or JSON body). Identical content again returns the existing version (200)."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("body", "not UTF-8 text") from None
    if not text.strip():
        raise invalid("body", "a workflow definition is required")
    try:
        wf = parse_definition(text)
    except DefinitionError as exc:
        problems = [{"field": f"body.{p.path}" if p.path != "<document>" else "body", "message": p.message,
                     "line": p.line} for p in exc.problems]
        raise ApiError(422, str(exc), problems=problems) from None
    key = caller(request)
    if not key.can_use(wf.name):
        raise ApiError(403, f"this key may not publish workflow {wf.name!r}")
    outside = sorted({n for n in trigger_names(wf) if not key.can_use_event(n)})
    if outside:
        # Subscribing would hand this workflow (and this key's readers) other workflows' trigger data.
        raise ApiError(403, f"this key may not subscribe {wf.name!r} to {', '.join(outside)}: its event binding is "
                            f"{', '.join(sorted(key.events or ())) or 'empty'} (weft keys create --events ...)",
                       problems=[{"field": "body.on", "message": f"outside this key's event binding: {n}"}
                                 for n in outside])
    ctx = request.app.state.ctx
    v = await asyncio.to_thread(ctx.registry.publish, wf)
    await asyncio.to_thread(ctx.catalog.refresh, force=True)
    response.status_code = 201 if v.created else 200
    warnings = []
    if ctx.step_modules is not None:
        from services.worker.steps.allowlist import refused_callables

        warnings = refused_callables(wf, ctx.step_modules)
        for warning in warnings:
            log.warning("published %s@%s: %s", v.name, v.version, warning)
    return out(v, definition=True, created=v.created) | {"warnings": warnings}


@router.get("", response_model=WorkflowList, responses=errors(), openapi_extra=scoped("read"))
def list_workflows(request: Request) -> Any:
    """Every workflow (that this key may see) with its latest version."""
    ctx = request.app.state.ctx
    ctx.catalog.refresh(force=True)
    key = caller(request)
    latest = ctx.catalog.latest()
    return {"items": [out(latest[n]) for n in sorted(latest) if key.can_use(n)]}


@router.get("/{name}", response_model=WorkflowVersionOut, responses=errors(404, 422), openapi_extra=scoped("read"))
def get_workflow(request: Request, name: str = NamePath) -> Any:
    """The latest version, with its definition; `NAME@VERSION` (as the CLI takes it) is that version."""
    base, sep, number = name.partition("@")  # names never hold an "@" (contracts.definitions.NAME)
    if sep:
        if not number.isdigit() or not 1 <= int(number) <= 2**31 - 1:
            raise ApiError(422, f"expected NAME or NAME@VERSION, got {name!r}",
                           problems=[{"field": "path.name", "message": "expected NAME or NAME@VERSION"}])
        return out(_version(request, base, int(number)), definition=True)
    return out(_version(request, name, None), definition=True)


@router.get("/{name}/versions", response_model=WorkflowList, responses=errors(404), openapi_extra=scoped("read"))
def list_versions(request: Request, name: str = NamePath) -> Any:
    """Every version, oldest first."""
    _visible(request, name)
    versions = request.app.state.ctx.registry.versions(name)
    if not versions:
        raise ApiError(404, f"no workflow named {name!r}")
    return {"items": [out(v) for v in versions]}


@router.get("/{name}/versions/{version}", response_model=WorkflowVersionOut, responses=errors(404),
            openapi_extra=scoped("read"))
def get_version(request: Request, name: str = NamePath, version: int = Path(ge=1, le=2**31 - 1)) -> Any:
    """One version, with its definition."""
    return out(_version(request, name, version), definition=True)


def _visible(request: Request, name: str) -> None:
    if not caller(request).can_use(name):
        raise ApiError(404, f"no workflow named {name!r}")  # a bound key does not learn what else exists


def _version(request: Request, name: str, version: int | None) -> Version:
    _visible(request, name)
    try:
        return request.app.state.ctx.registry.get(name, version)
    except UnknownWorkflow as exc:
        raise ApiError(404, str(exc)) from None
