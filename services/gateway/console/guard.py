"""Headers and checks that keep the console (and the API behind it) from being abused by other sites.

CSRF. The console keeps the API key in sessionStorage and sends it in the
`Authorization` header; nothing authenticates by cookie, so a forged cross-site
form or image request carries no credential and is refused by the API. A
cross-origin `fetch` cannot add that header either without a CORS preflight,
and the gateway answers no CORS. What is left is the gateway with auth off
(loopback only), where any page the operator visits could POST to
127.0.0.1: so an unsafe request whose `Origin` (or `Sec-Fetch-Site`) says it
comes from another site is refused, whatever the auth mode, and with auth off
the `Host` must be a loopback name (a DNS-rebinding page names its own host).
Servers calling webhooks send no `Origin` and are unaffected.

Reads are guarded too, by what browsers say about a request: a scripted request from another
origin carries that `Origin` (any method), and modern browsers send `Sec-Fetch-Site`; either
saying "another site" refuses the request unless it is a plain top-level navigation (a link
to the console). So another page cannot open live streams (using up `max_streams`) or probe
the API through the operator's browser. A request with two `Host` or `Origin` headers, and
with auth off one without `Host`, is refused: the checks must see the values the app sees.

Clickjacking. Every response says `X-Frame-Options: DENY` and CSP
`frame-ancestors 'none'`. The console's CSP allows scripts and styles from
this origin only (no inline script, no eval); `/v1/docs` (Swagger UI) also
needs inline styles and data: images.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.auth import is_loopback

CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
_SAFE = {"GET", "HEAD", "OPTIONS"}
_SINGLE = {"host", "origin", "sec-fetch-site"}  # headers the checks read: one each


def _csp(path: str) -> str:
    if path == "/ui" or path.startswith("/ui/"):
        return CONSOLE_CSP
    if path.startswith("/v1/docs"):
        return DOCS_CSP
    return API_CSP


def _reject(status: int, text: str) -> tuple[Message, Message]:
    # json.dumps: the text quotes headers the client chose (a quote in a Host must not end the string)
    body = json.dumps({"error": {"code": "forbidden", "message": text, "problems": []}}).encode()
    return (
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                     (b"x-frame-options", b"DENY"), (b"content-security-policy", API_CSP.encode())]},
        {"type": "http.response.body", "body": body},
    )


class Guard:
    """ASGI middleware: security headers on every response; cross-site unsafe requests refused."""

    def __init__(self, app: ASGIApp, *, loopback_hosts_only: bool = False):
        self.app, self.loopback_hosts_only = app, loopback_hosts_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        twice: set[str] = set()
        for k, v in scope.get("headers") or ():
            name = k.decode("latin-1").lower()
            if name in headers and name in _SINGLE:
                twice.add(name)
            headers[name] = v.decode("latin-1")
        problem = (f"{sorted(twice)[0]} is given twice" if twice else None) or self._problem(scope, headers)
        if problem:
            for message in _reject(403, problem):
                await send(message)
            return
        csp = _csp(scope.get("path", "")).encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer")]
                names = {k.lower() for k, _ in message.get("headers", [])}
                if b"content-security-policy" not in names:
                    extra.append((b"content-security-policy", csp))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _problem(self, scope: Scope, headers: dict[str, str]) -> str | None:
        host = headers.get("host", "")
        if self.loopback_hosts_only:
            name = urlsplit(f"//{host}").hostname or ""
            if not is_loopback(name):
                return f"auth is off: this gateway answers loopback names only, not Host {host or '(none)'}"
        method = scope.get("method", "GET")
        origin = headers.get("origin")
        if origin is not None:
            # Browsers send Origin on every unsafe request and on scripted (CORS-mode) reads from
            # another origin; a same-origin page reading, or a link followed, sends none.
            if origin == "null":
                return "cross-site request refused (Origin: null)"
            parts = urlsplit(origin)
            if parts.netloc.lower() != host.lower() or parts.scheme not in ("http", "https"):
                return f"cross-site request refused: Origin {origin} is not this gateway"
        site = headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site"):  # same-site: another port or subdomain of this host
            navigation = (method in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate"
                          and headers.get("sec-fetch-dest", "document") == "document")
            if not navigation:
                return "cross-site request refused"
        return None
