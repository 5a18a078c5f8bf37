"""The guard in front of the console and the API (services/gateway/console/guard.py), tried the
way another site, a DNS-rebinding page or a sloppy proxy would, over real HTTP against the real
gateway (keys required), and against a second real server of the same app with auth off
(loopback names only). And the pages: no data without a key, CSP and no framing on every one."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from services.gateway.app import create_app
from services.gateway.auth import Authenticator
from services.gateway.console.guard import CONSOLE_CSP, DOCS_CSP
from services.gateway.server import GatewayServer
from tests.integration.hostile_support import Gateway, running_gateway, status_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, nats_server: Any) -> Iterator[Gateway]:
    with running_gateway(request, tmp_path_factory.mktemp("console-guard"), nats_server.url) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def open_gw(gw: Gateway) -> Iterator[Gateway]:
    """The same stack behind a second server with auth off, as `weft up` runs it on loopback."""
    ctx = dataclasses.replace(gw.ctx)  # its own registry and dead-letter view, the same store and broker
    ctx.auth = Authenticator(ctx.keys, enabled=False)
    server = GatewayServer(create_app(ctx, loopback_hosts_only=True), "127.0.0.1", 0)
    loop = gw.loop

    async def make_stop() -> asyncio.Event:
        return asyncio.Event()

    stop = asyncio.run_coroutine_threadsafe(make_stop(), loop).result(5)
    serving = asyncio.run_coroutine_threadsafe(server.run(stop), loop)
    opened = Gateway.__new__(Gateway)
    opened.__dict__.update(gw.__dict__, url=server.url, port=server.port, ctx=ctx)
    try:
        yield opened
    finally:
        loop.call_soon_threadsafe(stop.set)
        serving.result(15)


def _request(g: Gateway, method: str, path: str, *headers: str, host: str | None = None, body: bytes = b"",
             key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += list(headers)
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines.append("Connection: close")
    raw = g.raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    head, _, content = raw.partition(b"\r\n\r\n")
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    return status_of(raw), fields, content


# ---- auth off: loopback Host names only (DNS rebinding) --------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "LocalHost",
                                  "[::1]:{port}", "[::1]", "127.0.0.2:{port}"])
def test_auth_off_answers_loopback_names(open_gw: Gateway, host: str) -> None:
    status, _, body = _request(open_gw, "GET", "/v1/whoami", host=host.format(port=open_gw.port))
    assert status == 200 and orjson.loads(body)["auth"] is False, body


@pytest.mark.parametrize("host", ["localhost.evil.com:{port}", "127.0.0.1.nip.io:{port}", "evil.example",
                                  "0.0.0.0:{port}", "127.0.0.1@evil.example", "localhost.", "127.1:{port}",
                                  "[::2]:{port}", '"}, "x": "y', None])
def test_auth_off_refuses_any_other_host(open_gw: Gateway, host: str | None) -> None:
    # None: no Host at all (HTTP/1.0 allows it; a browser always sends one, so nothing legitimate is lost)
    status, headers, body = _request(open_gw, "GET", "/v1/whoami", host=host and host.replace("{port}", str(open_gw.port)))
    assert status in (400, 403), (status, body)
    if status == 403:  # ours (400: the HTTP parser refused it first)
        error = orjson.loads(body)["error"]  # valid JSON whatever the Host held
        assert error["code"] == "forbidden" and "loopback names only" in error["message"], error
        assert headers["x-frame-options"] == "DENY"


def test_two_host_headers_are_refused(open_gw: Gateway, gw: Gateway) -> None:
    for g in (open_gw, gw):
        status, _, body = _request(g, "GET", "/v1/whoami", f"Host: evil.example:{g.port}",
                                   host=f"127.0.0.1:{g.port}", key=g.admin)
        assert status in (400, 403), body


# ---- another site, through the operator's browser -------------------------------------------------

@pytest.mark.parametrize("origin", ["null", "http://evil.example", "http://127.0.0.1:{other}", "http://localhost:{port}",
                                    "http://127.0.0.1:{port}.evil.example", "file://", "ftp://127.0.0.1:{port}",
                                    "http://127.0.0.1:{port}@evil.example", "chrome-extension://abc"])
def test_an_unsafe_request_from_another_origin_is_refused(gw: Gateway, origin: str) -> None:
    origin = origin.format(port=gw.port, other=gw.port + 1)
    status, headers, body = _request(gw, "POST", "/v1/executions", f"Origin: {origin}", host=f"127.0.0.1:{gw.port}",
                                     key=gw.admin, body=b'{"workflow": "two-steps"}')
    assert status == 403 and b"cross-site request refused" in body, (origin, status, body)
    assert headers["content-security-policy"].startswith("default-src 'none'")


def test_an_unsafe_request_from_this_origin_passes(gw: Gateway) -> None:
    for origin in (f"http://127.0.0.1:{gw.port}", f"HTTP://127.0.0.1:{gw.port}"):
        status, _, body = _request(gw, "POST", "/v1/executions/00000000-0000-0000-0000-000000000000/cancel",
                                   f"Origin: {origin}", "Sec-Fetch-Site: same-origin", host=f"127.0.0.1:{gw.port}",
                                   key=gw.admin)
        assert status == 404, body  # through the guard to the route


def test_two_origin_headers_are_refused(gw: Gateway) -> None:
    status, _, body = _request(gw, "POST", "/v1/executions", "Origin: http://evil.example",
                               f"Origin: http://127.0.0.1:{gw.port}", host=f"127.0.0.1:{gw.port}", key=gw.admin,
                               body=b'{"workflow": "two-steps"}')
    assert status == 403 and b"origin is given twice" in body, body


@pytest.mark.parametrize(("path", "headers", "allowed"), [
    # scripted reads from another site or another port of this host: refused (they could use up the
    # stream slots, or probe the API through the operator's browser when auth is off)
    ("/v1/changes", ("Origin: http://evil.example",), False),
    ("/v1/changes", ("Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: cors"), False),
    ("/v1/changes", ("Sec-Fetch-Site: same-site", "Sec-Fetch-Mode: cors"), False),
    ("/v1/whoami", ("Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: no-cors", "Sec-Fetch-Dest: script"), False),
    ("/ui/executions", ("Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: navigate", "Sec-Fetch-Dest: iframe"), False),
    ("/v1/whoami", ("Origin: null",), False),
    # a link followed from elsewhere, this origin's own page, a typed address, an API client: served
    ("/ui/executions", ("Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: navigate", "Sec-Fetch-Dest: document"), True),
    ("/v1/whoami", ("Sec-Fetch-Site: same-origin", "Sec-Fetch-Mode: cors"), True),
    ("/v1/whoami", ("Sec-Fetch-Site: none", "Sec-Fetch-Mode: navigate"), True),
    ("/v1/whoami", (), True),
])
def test_cross_site_reads(gw: Gateway, path: str, headers: tuple[str, ...], allowed: bool) -> None:
    status, _, body = _request(gw, "GET", path, *headers, host=f"127.0.0.1:{gw.port}", key=gw.admin)
    assert (status == 200) is allowed and (allowed or b"cross-site request refused" in body), (status, body[:200])


# ---- pages: no data without a key, CSP and no framing on every response -------------------------

def test_console_pages_carry_no_data_and_every_response_its_headers(gw: Gateway) -> None:
    pages = ["/ui/executions", f"/ui/executions/{gw.other}", "/ui/deadletters",
             "/ui/deadletters/00000000-0000-0000-0000-000000000000", "/ui/workflows", "/ui/workflows/other",
             "/ui/projections"]
    with gw.client() as c:  # no key
        for page in pages:
            r = c.get(page)
            assert r.status_code == 200, page
            assert r.headers["content-security-policy"] == CONSOLE_CSP and r.headers["x-frame-options"] == "DENY"
            assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"
            text = re.sub(r"[0-9a-f-]{36}", "", r.text)  # the id in the page's own address may appear
            assert gw.mine not in r.text and "noop" not in text and "<script>" not in r.text, page
        docs = c.get("/v1/docs")
        assert docs.status_code == 200 and docs.headers["content-security-policy"] == DOCS_CSP
        assert docs.headers["x-frame-options"] == "DENY"
        others = {"/ui/static/console.js": 200, "/v1/docs/assets/swagger-ui.css": 200, "/v1/openapi.json": 200,
                  "/ui/nope": 404, "/ui/workflows/%3Cscript%3E": 404, "/v1/executions": 401, "/healthz": 200}
        for path, status in others.items():
            r = c.get(path)
            assert r.status_code == status and r.headers["x-frame-options"] == "DENY", path
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
        for r in (c.put("/v1/whoami"), c.post("/v1/workflows", content=b"x" * (2 << 20))):  # 405, 413
            assert r.status_code in (405, 413) and r.headers["x-frame-options"] == "DENY", r.status_code
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


@pytest.mark.parametrize("path", [b"/ui/static/../guard.py", b"/ui/static/..%2Fguard.py", b"/ui/static/%2e%2e/guard.py",
                                  b"/v1/docs/assets/..%2F..%2F__init__.py", b"/ui/static/%2e%2e%2f%2e%2e%2fkeys.py",
                                  b"/ui/static//etc/passwd", b"/ui/static/%00"])
def test_static_files_stay_in_their_folders(gw: Gateway, path: bytes) -> None:
    raw = gw.get_raw(path)
    assert status_of(raw) == 404 and b"x-frame-options: DENY" in raw, raw[:200]
