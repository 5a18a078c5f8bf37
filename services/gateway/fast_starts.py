"""The hot path of `POST /v1/executions`, below FastAPI's routing.

A start through FastAPI costs about 0.5 ms of CPU in routing, dependency
solving and response validation before and after the 0.1 ms that is Weft's
own work (bench/starts.py --profile). This ASGI middleware answers the common
case itself: a JSON body that is a valid `StartRequest`, a caller allowed to
start the workflow, no query string, tracing off. It runs the same checks
(`check_value`, the `StartRequest` model, the key's scope and bindings) and
the same group commit as the route, and answers with the same body.

Everything else (a body FastAPI would refuse, an unknown key, a query string,
tracing on) goes on to the FastAPI route untouched, which answers it as it
always has: the fast path only ever says yes, or hands over. It sits inside
`BodyLimit` (the body is already bounded) and `RequestMetrics` (a fast answer
is counted under the route's template like any other).
"""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.values import ValueProblem, check_value
from services.gateway.errors import ApiError, _respond, error_response, replaying
from services.gateway.models import ExecutionOut, StartRequest
from services.gateway.routes_executions import summary
from services.gateway.routes_starts import _count, group_commit
from services.orchestrator.starts import StartItem
from services.store import StoreUnavailableError
from services.telemetry import tracing

PATH = "/v1/executions"


class FastStarts:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != PATH
                or scope.get("query_string") or tracing.enabled()):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            more = message.get("more_body", False)
        handled = await self._start(scope, bytes(body), send)
        if handled:
            return
        await self.app(scope, replaying(bytes(body), receive), send)

    async def _start(self, scope: Scope, body: bytes, send: Send) -> bool:
        """True when answered here; False to hand the request to the FastAPI route."""
        headers = {}
        for name, value in scope.get("headers") or ():
            if name in headers:
                return False  # a repeated header: the route decides what it means
            headers[name] = value
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media != b"application/json" and not media.endswith(b"+json"):
            return False
        key_header = headers.get(b"idempotency-key")
        idempotency_key = None
        if key_header is not None:
            try:
                idempotency_key = key_header.decode("ascii")
            except UnicodeDecodeError:
                return False
            if not 1 <= len(idempotency_key) <= 256:
                return False
        try:
            # The parser FastAPI uses (orjson would read a 77-bit integer as a float, where this one
            # keeps it whole for check_value to refuse, as the route does).
            raw = json.loads(body)
            check_value(raw, "body")
            start = StartRequest.model_validate(raw)
        except (ValueError, ValueProblem, ValidationError, RecursionError):
            return False  # the route answers it, naming the field
        request = Request(scope)
        ctx = request.app.state.ctx
        try:
            key = await ctx.auth.identify(request)
        except ApiError:
            return False
        if key is None or not key.allows("trigger") or not key.can_use(start.workflow):
            return False
        item = StartItem(start.workflow, start.input, start.version, idempotency_key, tracing.incoming.get())
        scope["route"] = _TEMPLATE  # RequestMetrics labels it with the route's template, as if routed
        try:
            [out] = await group_commit(request).submit([item])
        except StoreUnavailableError:
            await error_response(503, "the event store is unreachable; try again",
                                 headers={"Retry-After": "1"})(scope, _nothing, send)
            return True
        _count([out])
        if out.status >= 300:
            error = ApiError(out.status, out.message, code=out.code if out.status != 422 else None,
                             problems=[dict(p) for p in out.problems])
            await _respond(error)(scope, _nothing, send)
            return True
        assert out.state is not None
        answer = ExecutionOut.model_validate(summary(out.state) | {"created": out.status == 201})
        data = answer.__pydantic_serializer__.to_json(answer)
        await send({"type": "http.response.start", "status": out.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
        return True


class _Template:
    """What RequestMetrics reads of a matched route: its path template."""

    path = PATH


_TEMPLATE = _Template()


async def _nothing() -> Message:
    return {"type": "http.disconnect"}
