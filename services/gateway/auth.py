"""Authentication and scopes, checked before a route reads its body.

A route declares its scope with `scoped("read" | "trigger" | "admin")` (which
also documents it in the OpenAPI operation). `ScopedRoute` checks it before
FastAPI parses anything, so an unauthenticated caller learns nothing about
the route's input (401 comes before 422). The key goes in
`Authorization: Bearer weft_...` or `X-API-Key: weft_...`.

With auth off (only allowed on a loopback address), every caller is an
unbound admin.
"""

from __future__ import annotations

import asyncio
import ipaddress
from datetime import datetime, timezone
from typing import Any, Callable, Coroutine

from fastapi import Request, Response
from fastapi.routing import APIRoute

from services.gateway.errors import ApiError
from services.gateway.keys import ApiKey, Keys

SCOPE_KEY = "x-weft-scope"
OPEN = ApiKey("-", frozenset({"admin"}), None, "auth off", datetime(1970, 1, 1, tzinfo=timezone.utc))
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="weft"'}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def scoped(scope: str | None) -> dict[str, Any]:
    """openapi_extra for a route: its scope, and the security requirement."""
    if scope is None:
        return {}
    return {SCOPE_KEY: scope, "security": [{"bearer": []}, {"apiKey": []}]}


def token_of(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        kind, _, value = auth.partition(" ")
        if kind.lower() == "bearer" and value.strip():
            return value.strip()
        return auth.strip()  # a scheme we do not know: let it fail as an unknown key
    key = request.headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


class Authenticator:
    def __init__(self, keys: Keys, *, enabled: bool):
        self.keys, self.enabled = keys, enabled

    async def identify(self, request: Request) -> ApiKey | None:
        """The caller's key (OPEN when auth is off); None without a key. 401 for a bad key."""
        if not self.enabled:
            return OPEN
        token = token_of(request)
        if token is None:
            return None
        key = await asyncio.to_thread(self.keys.authenticate, token)
        if key is None:
            raise ApiError(401, "unknown or revoked API key", headers=_CHALLENGE)
        return key

    async def require(self, request: Request, scope: str) -> ApiKey:
        key = await self.identify(request)
        if key is None:
            raise ApiError(401, "an API key is required (Authorization: Bearer <key>)", headers=_CHALLENGE)
        if not key.allows(scope):
            raise ApiError(403, f"this key lacks the {scope!r} scope (it has: {', '.join(sorted(key.scopes))})")
        return key


class ScopedRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        scope = (self.openapi_extra or {}).get(SCOPE_KEY)
        if scope is None:
            return handler

        async def checked(request: Request) -> Response:
            auth: Authenticator = request.app.state.ctx.auth
            request.state.key = await auth.require(request, scope)
            return await handler(request)

        return checked


def caller(request: Request) -> ApiKey:
    return getattr(request.state, "key", OPEN)


def who(key: ApiKey) -> str:
    return "api" if key is OPEN else f"key:{key.key_id}"
