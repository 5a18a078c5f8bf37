"""What the gateway accepts in a JSON body and a query string, checked in one place.

`checked_request` is a dependency of every route (see app.create_app). FastAPI has
already parsed a JSON body with Python's `json` by then (a body too deep for that
parser is a 400 that errors.py explains); this walks the parsed value once with
contracts.values.check_value, before pydantic sees it, so a value the store,
orjson or the broker could not carry (a 65-bit integer, NaN, a lone surrogate,
more than MAX_DEPTH levels) is a 422 naming the field and the limit, not a 500
further down. Query values get the surrogate check too.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.routing import APIRoute

from contracts.values import ValueProblem, check_value
from services.gateway.errors import invalid


async def checked_request(request: Request) -> None:
    for name, value in request.query_params.multi_items():
        try:
            check_value(value, f"query.{name}")
        except ValueProblem as exc:
            raise invalid(exc.path, exc.message) from None
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or route.body_field is None:
        return  # routes that read their body raw (workflows, webhooks) check what they parse
    if not await request.body():
        return
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        return  # FastAPI did not parse it as JSON, and answers 422 for it
    try:
        value = await request.json()  # cached: FastAPI parsed it already
    except (ValueError, RecursionError):
        return  # FastAPI answered this one already
    try:
        check_value(value, "body")
    except ValueProblem as exc:
        raise invalid(exc.path, exc.message) from None
