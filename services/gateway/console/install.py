"""Wiring the console into the gateway's app: pages, static files, Swagger UI's assets, the guard."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from services.gateway.console.guard import Guard

HERE = Path(__file__).parent


def _swagger_assets() -> Path | None:
    """Swagger UI's files as the `fastapi-offline` package installed them (never copied into this repo).

    Swagger UI 5 is needed: our schema is OpenAPI 3.1, which 4.x cannot render (the
    `swagger-ui-bundle` package ships 4.15)."""
    try:
        import fastapi_offline
    except ImportError:  # pragma: no cover - a declared dependency; /v1/docs says what is missing
        return None
    return Path(fastapi_offline.__file__).parent / "static"


_DOCS = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Weft API</title>
<link rel="stylesheet" href="/v1/docs/assets/swagger-ui.css">
<link rel="icon" href="/ui/static/favicon.svg"></head>
<body><div id="swagger-ui"></div>
<script src="/v1/docs/assets/swagger-ui-bundle.js"></script>
<script src="/ui/static/docs.js"></script>
</body></html>"""


def install(app: FastAPI, *, loopback_hosts_only: bool = False) -> None:
    from services.gateway.console import pages

    app.add_middleware(Guard, loopback_hosts_only=loopback_hosts_only)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.include_router(pages.router)
    assets = _swagger_assets()
    if assets is not None:
        app.mount("/v1/docs/assets", StaticFiles(directory=assets), name="swagger-assets")

    @app.get("/v1/docs", include_in_schema=False, response_class=HTMLResponse)
    async def docs(request: Request) -> HTMLResponse:
        """Swagger UI from the installed package: no CDN, works offline."""
        if assets is None:
            return HTMLResponse("Swagger UI is not installed (pip install fastapi-offline)", status_code=503)
        return HTMLResponse(_DOCS)
