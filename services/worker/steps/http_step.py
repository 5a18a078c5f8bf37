"""`http` steps: one HTTP request, guarded against SSRF (see `ssrf.py`).

    with: {method: POST, url: "https://example.com/hook", headers: {...}, timeout: 10}
    input: {body: ..., params: {...}, headers: {...}}     # all optional

`input.body` is sent as JSON; `input.params` become the query string;
`input.headers` are merged over `with.headers`. The step's idempotency key goes
out as `Idempotency-Key` unless a header of that name is already set.

Result: `{"status": int, "headers": {lower-case name: value}, "body": JSON or
text}` (body is parsed JSON when the response says it is JSON, else text;
None when empty). 5xx and 429 raise `HttpRetryableStatus` (retryable, with
Retry-After as `next_retry_delay`); other 4xx raise `HttpClientError`
(non-retryable). Redirects are followed here, not by httpx, so every hop is
checked; `timeout` bounds the whole call, redirects included.

`with:` fields may be expressions (`url: "${{ input.url }}"`): the orchestrator
renders them, and the SSRF guard checks the URL that results, at run time.
Credentials: a credential header of `with.headers` (Authorization, Cookie,
X-API-Key, ... see `contracts.secrets.CREDENTIAL_HEADERS`) must come from a
secret (`"Bearer ${{ secrets.API_TOKEN }}"`); a definition with a literal one
is refused at publish, and at run time a value that is not a resolved secret
is refused too. `with.auth` builds the Authorization header from secrets:
`{bearer: "${{ secrets.T }}"}` or `{username: u, password: "${{ secrets.P }}"}`.
On a redirect to another origin (scheme, host or port), credential headers
and every header that came from a secret are dropped.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from contracts.secrets import CREDENTIAL_HEADERS, names_in
from services.worker.secrets import Secret
from services.worker.steps.registry import StepInputError, check_keys, config_error, is_template
from services.worker.steps.ssrf import (
    ALLOWED_SCHEMES,
    AddressGuard,
    GuardedTransport,
    HttpPolicy,
    Resolver,
    parse_url,
    safe_url,
)
from weft.steps import NonRetryableError, RetryableError, StepContext

__all__ = [
    "HttpStep",
    "HttpClientError",
    "HttpRetryableStatus",
    "HttpTransportError",
    "ResponseTooLarge",
    "TooManyRedirects",
    "parse_retry_after",
    "METHODS",
]

TYPE = "http"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_TIMEOUT = 3600.0
MAX_RETRY_AFTER = 24 * 3600.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_ERROR_BODY_CHARS = 500


class HttpClientError(NonRetryableError):
    """A 4xx answer (other than 429): the request itself is wrong; retrying will not help."""

    def __init__(self, method: str, url: str, status: int, body: Any):
        super().__init__(f"http step: {method} {url} returned {status}{_snippet(body)}")
        self.status = status
        self.body = body
        self.url = url


class HttpRetryableStatus(RetryableError):
    """A 5xx or 429 answer; `next_retry_delay` carries Retry-After when the server sent one."""

    def __init__(self, method: str, url: str, status: int, body: Any, next_retry_delay: float | None):
        super().__init__(
            f"http step: {method} {url} returned {status}{_snippet(body)}", next_retry_delay=next_retry_delay
        )
        self.status = status
        self.body = body
        self.url = url


class HttpTransportError(RetryableError):
    """Connecting, sending or receiving failed, or timed out."""


class ResponseTooLarge(NonRetryableError):
    def __init__(self, url: str, limit: int):
        super().__init__(f"http step: response from {url} is larger than {limit} bytes")
        self.url = url
        self.limit = limit


class TooManyRedirects(NonRetryableError):
    def __init__(self, url: str, limit: int):
        super().__init__(f"http step: more than {limit} redirects, starting at {url}")
        self.url = url
        self.limit = limit


def _snippet(body: Any) -> str:
    if body in (None, ""):
        return ""
    text = body if isinstance(body, str) else orjson.dumps(body).decode()
    if len(text) > _ERROR_BODY_CHARS:
        text = text[:_ERROR_BODY_CHARS] + "..."
    return f": {text}"


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), capped at 24 h."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _check_headers(where: str, headers: Any, error: Any) -> dict[str, str]:
    if not isinstance(headers, Mapping):
        raise error(where, f"must be a mapping of header name to string, not {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise error(where, f"header {name!r} must map a name to a string value")
        if any(c in name + value for c in "\r\n\0"):
            raise error(where, f"header {name!r} contains a line break or NUL")
    return dict(headers)


def _merge_headers(*layers: Mapping[str, str]) -> dict[str, str]:
    # Case-insensitive merge: later layers win, the spelling of the winner is kept.
    merged: dict[str, tuple[str, str]] = {}
    for layer in layers:
        for name, value in layer.items():
            merged[name.lower()] = (name, value)
    return dict(merged.values())


_SECRET_FORM = ("holds a credential and must come from a secret, resolved on the worker from its environment "
                "(WEFT_SECRET_<NAME>) or secrets folder: {name}: \"Bearer ${{{{ secrets.API_TOKEN }}}}\"")


def _from_secret(value: Any, static: bool) -> bool:
    # Before publishing the reference is still text; at run time the worker has made it a Secret.
    return isinstance(value, Secret) if not static else isinstance(value, str) and bool(names_in(value))


def _check_auth(auth: Any, static: bool) -> None:
    if not isinstance(auth, Mapping):
        raise config_error(TYPE, "auth", "must be {bearer: <secret>} or {username: ..., password: <secret>}")
    check_keys(TYPE, {f"auth.{k}": v for k, v in auth.items()}, ("auth.bearer", "auth.username", "auth.password"))
    if "bearer" in auth:
        if set(auth) != {"bearer"}:
            raise config_error(TYPE, "auth", "bearer cannot be combined with username/password")
        if not _from_secret(auth["bearer"], static):
            raise config_error(TYPE, "auth.bearer", "must be a secret: bearer: \"${{ secrets.API_TOKEN }}\"")
        return
    if set(auth) != {"username", "password"}:
        raise config_error(TYPE, "auth", "needs bearer, or both username and password")
    if not isinstance(auth["username"], str) or ":" in auth["username"]:
        raise config_error(TYPE, "auth.username", "must be a string without ':'")
    if not _from_secret(auth["password"], static):
        raise config_error(TYPE, "auth.password", "must be a secret: password: \"${{ secrets.API_PASSWORD }}\"")


def _auth_header(auth: Any) -> dict[str, str]:
    if not auth:
        return {}
    if "bearer" in auth:
        return {"Authorization": Secret(f"Bearer {auth['bearer']}")}
    pair = f"{auth['username']}:{auth['password']}".encode()
    return {"Authorization": Secret("Basic " + base64.b64encode(pair).decode())}


def _decode_body(response: httpx.Response, raw: bytes) -> Any:
    if not raw:
        return None
    content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # mislabelled: hand back the text rather than fail a 200
    encoding = response.charset_encoding or "utf-8"
    try:
        return raw.decode(encoding, errors="replace")
    except LookupError:
        return raw.decode("utf-8", errors="replace")


class HttpStep:
    def __init__(self, policy: HttpPolicy | None = None, *, resolver: Resolver | None = None):
        self.policy = policy or HttpPolicy()
        self.guard = AddressGuard(self.policy, resolver)

    def validate_config(self, config: Mapping[str, Any]) -> None:
        self._check_config(config, static=True)

    def _check_config(self, config: Mapping[str, Any], *, static: bool) -> None:
        # Before publishing, `${{ }}` values are unknown and skipped; at run time
        # they are rendered and checked like any other. At run time the URL's
        # scheme and host are left to the guard, so a refused URL is always an
        # SsrfBlocked, whoever wrote it.
        def later(value: Any) -> bool:
            return static and is_template(value)

        check_keys(TYPE, config, ("method", "url", "headers", "timeout", "auth"))
        method = config.get("method", "GET")
        if not later(method):
            if not isinstance(method, str) or method.upper() not in METHODS:
                raise config_error(TYPE, "method", f"must be one of {', '.join(sorted(METHODS))}, got {method!r}")
        if "url" not in config:
            raise config_error(TYPE, "url", "required")
        url = config["url"]
        if not isinstance(url, str):
            raise config_error(TYPE, "url", f"must be a string, not {type(url).__name__}")
        if isinstance(url, Secret):  # refused at publish; a forged command must not get one there either
            raise config_error(TYPE, "url", "a secret cannot be part of the URL: send it in a header or auth")
        if not static:
            pass
        elif is_template(url):
            # Only a literal prefix ("https://api/${{ ... }}") can be checked now.
            prefix = url.split("${{", 1)[0]
            if "://" in prefix and prefix.split("://", 1)[0].strip().lower() not in ALLOWED_SCHEMES:
                raise config_error(TYPE, "url", f"must be an http:// or https:// URL, got {url!r}")
        else:
            try:
                parsed = httpx.URL(url)
            except httpx.InvalidURL as exc:
                raise config_error(TYPE, "url", f"not a valid URL: {exc}") from None
            if parsed.scheme not in ALLOWED_SCHEMES:
                raise config_error(TYPE, "url", f"must be an http:// or https:// URL, got {url!r}")
            if not parsed.host:
                raise config_error(TYPE, "url", f"has no host: {url!r}")
        if "headers" in config and not later(config["headers"]):
            headers = _check_headers("headers", config["headers"], lambda f, r: config_error(TYPE, f, r))
            for name, value in headers.items():
                if name.lower() in CREDENTIAL_HEADERS and not _from_secret(value, static):
                    raise config_error(TYPE, f"headers.{name}", _SECRET_FORM.format(name=name))
        if "auth" in config:
            _check_auth(config["auth"], static)
        if "timeout" in config and not later(config["timeout"]):
            timeout = config["timeout"]
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
                raise config_error(TYPE, "timeout", f"must be a number of seconds, got {timeout!r}")
            if not 0 < timeout <= MAX_TIMEOUT:
                raise config_error(TYPE, "timeout", f"must be > 0 and at most {MAX_TIMEOUT:g}, got {timeout!r}")

    async def __call__(self, input: Any, config: Mapping[str, Any], ctx: StepContext) -> Any:
        self._check_config(config, static=False)
        method = str(config.get("method", "GET")).upper()
        url: str = config["url"]
        timeout = float(config.get("timeout", self.policy.timeout))

        data: Mapping[str, Any] = {}
        if input is not None:
            if not isinstance(input, Mapping):
                kind = type(input).__name__
                raise StepInputError(TYPE, "", f"must be a mapping with body/params/headers, not {kind}")
            data = input
        in_headers = _check_headers("headers", data.get("headers") or {}, lambda f, r: StepInputError(TYPE, f, r))
        params = data.get("params")
        if params is not None and not isinstance(params, Mapping):
            raise StepInputError(TYPE, "params", f"must be a mapping, not {type(params).__name__}")
        headers = _merge_headers(
            {"Idempotency-Key": ctx.idempotency_key},
            _auth_header(config.get("auth")),
            dict(config.get("headers") or {}),
            in_headers,
        )
        content: bytes | None = None
        if "body" in data:
            try:
                content = orjson.dumps(data["body"])
            except orjson.JSONEncodeError as exc:
                raise StepInputError(TYPE, "body", f"not JSON-serialisable: {exc}") from None
            if not any(name.lower() == "content-type" for name in headers):
                headers["Content-Type"] = "application/json"

        try:
            async with asyncio.timeout(timeout):
                return await self._send(method, url, params, headers, content, timeout)
        except TimeoutError:
            raise HttpTransportError(f"http step: {method} {_display(url)} timed out after {timeout:g}s") from None

    async def _send(
        self,
        method: str,
        url: str,
        params: Mapping[str, Any] | None,
        headers: dict[str, str],
        content: bytes | None,
        timeout: float,
    ) -> dict[str, Any]:
        first = _display(url)
        async with httpx.AsyncClient(
            transport=GuardedTransport(self.guard),
            follow_redirects=False,
            trust_env=False,
            timeout=timeout,
        ) as client:
            current = parse_url(url, params)
            for _hop in range(self.policy.max_redirects + 1):
                await self.guard.check_url(current)
                request = client.build_request(method, current, headers=headers, content=content)
                try:
                    response = await client.send(request, stream=True)
                except httpx.TimeoutException as exc:
                    raise HttpTransportError(f"http step: {method} {_display(current)} timed out: {exc!r}") from None
                except httpx.TransportError as exc:
                    raise HttpTransportError(f"http step: {method} {_display(current)} failed: {exc!r}") from None
                try:
                    status, location = response.status_code, response.headers.get("location")
                    if status in _REDIRECTS and location:
                        try:
                            target = current.join(location)
                        except httpx.InvalidURL as exc:
                            raise HttpClientError(method, _display(current), status, f"bad Location: {exc}") from None
                        method, content, headers = _redirected(status, method, content, headers, current, target)
                        current = target
                        continue
                    raw = await self._read_capped(response, _display(current))
                finally:
                    await response.aclose()
                return self._result(method, _display(current), response, raw)
        raise TooManyRedirects(first, self.policy.max_redirects)

    async def _read_capped(self, response: httpx.Response, where: str) -> bytes:
        limit = self.policy.max_response_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ResponseTooLarge(where, limit)
        buf = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                buf += chunk
                if len(buf) > limit:
                    raise ResponseTooLarge(where, limit)
        except httpx.TimeoutException as exc:
            raise HttpTransportError(f"http step: reading the response from {where} timed out: {exc!r}") from None
        except httpx.TransportError as exc:
            raise HttpTransportError(f"http step: reading the response from {where} failed: {exc!r}") from None
        return bytes(buf)

    def _result(self, method: str, where: str, response: httpx.Response, raw: bytes) -> dict[str, Any]:
        status = response.status_code
        body = _decode_body(response, raw)
        if status >= 500 or status == 429:
            delay = parse_retry_after(response.headers.get("retry-after"))
            raise HttpRetryableStatus(method, where, status, body, delay)
        if status >= 400:
            raise HttpClientError(method, where, status, body)
        return {"status": status, "headers": dict(response.headers.items()), "body": body}


def _redirected(
    status: int,
    method: str,
    content: bytes | None,
    headers: dict[str, str],
    source: httpx.URL,
    target: httpx.URL,
) -> tuple[str, bytes | None, dict[str, str]]:
    """Method, body and headers for the next hop, as browsers (and httpx) do it."""
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        method, content = "GET", None
        headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
    if (source.scheme, source.host, source.port) != (target.scheme, target.host, target.port):
        # Credentials meant for one origin must not follow a redirect to another: the known
        # credential headers, and any header whose value came from a secret.
        headers = {k: v for k, v in headers.items()
                   if k.lower() not in CREDENTIAL_HEADERS and not isinstance(v, Secret)}
    return method, content, headers


def _display(url: str | httpx.URL) -> str:
    try:
        return safe_url(url if isinstance(url, httpx.URL) else httpx.URL(url))
    except Exception:
        return "<invalid URL>"
