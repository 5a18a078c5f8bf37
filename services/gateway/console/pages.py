"""The console's pages: each renders the layout and the page's frame; its script fills it from `/v1`.

The HTML carries no data (the API key lives in the browser's sessionStorage,
so the server cannot know whose page it renders); it knows only whether the
gateway takes keys, for the banner and the sign-in form.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from services.gateway.errors import ApiError

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
_ID = re.compile(r"[0-9a-fA-F-]{1,64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
NAV = (("executions", "Executions"), ("deadletters", "Dead letters"), ("workflows", "Workflows"),
       ("projections", "Projections"))


def _page(request: Request, template: str, section: str, **extra: Any) -> Response:
    ctx = request.app.state.ctx
    context = {"auth": ctx.auth.enabled, "nav": NAV, "section": section, "script": template.removesuffix(".html"),
               **extra}
    response = templates.TemplateResponse(request, template, context)
    response.headers["Cache-Control"] = "no-store"
    return response


def _checked(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        raise ApiError(404, f"no {what} {value!r}")
    return value


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
async def home() -> Response:
    return RedirectResponse("/ui/executions", status_code=307)


@router.get("/executions", response_class=HTMLResponse)
async def executions(request: Request) -> Response:
    return _page(request, "executions.html", "executions")


@router.get("/executions/{execution_id}", response_class=HTMLResponse)
async def execution(request: Request, execution_id: str) -> Response:
    return _page(request, "execution.html", "executions", execution_id=_checked(execution_id, _ID, "execution"))


@router.get("/deadletters", response_class=HTMLResponse)
async def deadletters(request: Request) -> Response:
    return _page(request, "deadletters.html", "deadletters")


@router.get("/deadletters/{dead_letter_id}", response_class=HTMLResponse)
async def deadletter(request: Request, dead_letter_id: str) -> Response:
    return _page(request, "deadletter.html", "deadletters",
                 dead_letter_id=_checked(dead_letter_id, _ID, "dead letter"))


@router.get("/workflows", response_class=HTMLResponse)
async def workflows(request: Request) -> Response:
    return _page(request, "workflows.html", "workflows")


@router.get("/workflows/{name}", response_class=HTMLResponse)
async def workflow(request: Request, name: str) -> Response:
    return _page(request, "workflow.html", "workflows", workflow=_checked(name, _NAME, "workflow"))


@router.get("/projections", response_class=HTMLResponse)
async def projections(request: Request) -> Response:
    return _page(request, "projections.html", "projections")
