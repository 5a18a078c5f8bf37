"""The gateway's error model: every error is `{"error": {code, message, problems, error_id}}`.

401 no or unknown key, 403 a scope or workflow binding forbids it, 404 unknown
resource, 409 the command does not apply to the execution as it is, 413 body
over the limit, 422 invalid input (each problem names its field), 503 the
store or broker is unreachable, 500 anything else: logged here with a
traceback under an error id, answered with only that id.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.payloads import PayloadError, PayloadTooLarge
from contracts.values import MAX_DEPTH, MAX_ELEMENTS, elements_in
from services.broker import BrokerError
from services.gateway.models import ErrorBody
from services.store import StoreUnavailableError

log = logging.getLogger("weft.gateway")

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          406: "not_acceptable", 409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid",
          500: "internal", 503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None,
                 problems: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code or _CODES.get(status, "error")
        self.problems = problems or []
        self.headers = headers


def invalid(field: str, message: str) -> ApiError:
    """A 422 for one bad input: `field: message`, with the problem naming the field."""
    return ApiError(422, f"{field}: {message}", problems=[{"field": field, "message": message}])


class SafeJSONResponse(JSONResponse):
    """An error must always be answerable, even when its message quotes input that is not
    Unicode (a lone surrogate): such characters are escaped instead of failing the response."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "replace")


def error_response(status: int, message: str, *, code: str | None = None, problems: list[dict[str, Any]] | None = None,
                   error_id: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code or _CODES.get(status, "error"), "message": message, "problems": problems or []}
    if error_id:
        body["error_id"] = error_id
    return SafeJSONResponse({"error": body}, status_code=status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _respond(exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, code=exc.code, problems=exc.problems, headers=exc.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")} for e in exc.errors()]
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and "json" not in media and any(p["field"] == "body" for p in problems):
            problems = [{"field": "body", "message": f"send JSON with Content-Type: application/json (not {media})"}]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems) or "invalid request"
        return error_response(422, message, problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 400:  # FastAPI's "error parsing the body": invalid input like any other
            if isinstance(exc.__cause__, RecursionError):
                return _respond(invalid("body", f"nested deeper than {MAX_DEPTH} levels"))
            return _respond(invalid("body", "could not be parsed (send UTF-8 JSON)"))
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(_: Request, exc: PayloadTooLarge) -> JSONResponse:
        return error_response(413, str(exc), problems=[{"field": exc.what, "message": str(exc)}])

    @app.exception_handler(PayloadError)
    async def _payload(_: Request, exc: PayloadError) -> JSONResponse:
        return _respond(invalid(getattr(exc, "what", "body"), str(exc)))

    @app.exception_handler(StoreUnavailableError)
    async def _store_down(_: Request, exc: StoreUnavailableError) -> JSONResponse:
        log.warning("store unavailable: %s", exc)
        return error_response(503, "the event store is unreachable; try again", headers={"Retry-After": "1"})

    @app.exception_handler(BrokerError)
    async def _broker_down(_: Request, exc: BrokerError) -> JSONResponse:
        log.warning("broker error: %s", exc)
        return error_response(503, "the broker is unreachable; try again", headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:16]
        log.error("error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error; the server log has the details under this error_id",
                              error_id=error_id)


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (401, "No API key, or an unknown or revoked one"),
        (403, "The key's scopes or workflow binding do not allow this"),
        (413, "The body is over the limit"),
        (422, "Invalid input; each problem names its field"),
        (500, "Internal error (answered with an error_id only)"),
        (503, "The store or the broker is unreachable"),
    )
}


def errors(*extra: int) -> dict[int | str, dict[str, Any]]:
    text = {404: "Not found", 409: "The command does not apply to the execution as it is"}
    out = dict(ERRORS)
    for status in extra:
        out[status] = {"model": ErrorBody, "description": text.get(status, "Error")}
    return out


def carries_payload(method: str, path: str) -> bool:
    """Requests whose body is a payload (an execution input, a trigger's data, a replay's input):
    those may be as big as the payload policy's maximum, every other body stays small."""
    if method != "POST":
        return False
    return (path in ("/v1/executions", "/v1/executions:batch", "/v1/triggers") or path.startswith("/v1/webhooks/")
            or (path.startswith("/v1/executions/") and path.endswith("/replay")))


def _is_json(scope: Scope) -> bool:
    media = dict(scope.get("headers") or ()).get(b"content-type", b"").split(b";")[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body read already, then the connection's own messages
    (a middleware that had to read the whole body first passes the request on with this)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes (`large` for bodies that carry a
    payload, see carries_payload) gets 413, whether it declares its length or streams it;
    nothing of it reaches the application."""

    def __init__(self, app: ASGIApp, limit: int, large: int | None = None):
        self.app, self.small = app, limit
        self.large = max(large or limit, limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.large if carries_payload(scope.get("method", ""), scope.get("path", "")) else self.small
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = 0
            if size > limit:
                await self._reject(scope, receive, send, limit, f"{size} bytes")
                return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            more = message.get("more_body", False)
            if len(body) > limit:
                await self._reject(scope, receive, send, limit, f"more than {limit} bytes")
                return
        if len(body) > 2 * MAX_ELEMENTS and _is_json(scope) and elements_in(bytes(body)) > MAX_ELEMENTS:
            # before any parser builds millions of objects out of it (see contracts.values.loads)
            problem = invalid("body", f"more than {MAX_ELEMENTS} elements")
            await error_response(422, problem.message, problems=problem.problems)(scope, receive, send)
            return
        await self.app(scope, replaying(bytes(body), receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, limit: int, size: str) -> None:
        response = error_response(413, f"the request body is {size}, over the limit of {limit} bytes",
                                  problems=[{"field": "body", "message": f"{size}; at most {limit} bytes"}])
        await response(scope, receive, send)
