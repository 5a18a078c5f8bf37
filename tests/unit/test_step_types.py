"""Step-type registry and built-in step types (services/worker/steps)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from contracts.definitions import BUILTIN_STEP_TYPES as CONTRACT_STEP_TYPES
from services.worker.steps import (
    BUILTIN_STEP_TYPES,
    CallableImportError,
    HostResolutionError,
    HttpClientError,
    HttpPolicy,
    HttpRetryableStatus,
    HttpStep,
    HttpTransportError,
    OutputNotJSONError,
    ResponseTooLarge,
    SsrfBlocked,
    StepInputError,
    StepRegistry,
    StepTypeError,
    TooManyRedirects,
    TransformError,
    UnknownStepTypeError,
    check_url,
    default_registry,
)
from services.worker.steps import StepModules, pycall
from services.worker.steps.http_step import parse_retry_after
from services.worker.steps.ssrf import address_problem
from weft import NonRetryableError, RetryableError, StepContext

SAMPLES = "tests.unit.sample_steps"
ALLOWED = StepModules(("tests.unit",))


@pytest.fixture
def ctx() -> StepContext:
    return StepContext(execution_id="ex-1", step_id="s1", attempt=2, idempotency_key="ex-1:s1", item=None)


def non_retryable(exc: BaseException) -> bool:
    """The worker's rule: a NonRetryableError, or a truthy `non_retryable` attribute."""
    return isinstance(exc, NonRetryableError) or bool(getattr(exc, "non_retryable", False))


# ---- a real local HTTP server ----------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json", **headers: str) -> None:
        try:
            self.send_response(status)
            if body or status not in (204, 304):
                self.send_header("Content-Type", content_type)
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            if "Content_Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout tests): nothing to tell it
            pass

    def _json(self, status: int, value: Any, **headers: str) -> None:
        self._send(status, json.dumps(value).encode(), **headers)

    def _handle(self) -> None:
        self.server.requests.append((self.command, self.path, self.headers.get("Host", "")))
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = parts.path
        if path in ("/json", "/echo"):
            self._json(
                200,
                {
                    "ok": True,
                    "method": self.command,
                    "path": path,
                    "query": query,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(raw) if raw else None,
                },
            )
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            extra = {}
            if "retry_after" in query:
                extra["Retry-After"] = query["retry_after"]
            self._json(status, {"error": f"status {status}"}, **extra)
        elif path == "/redirect":
            self._send(int(query.get("code", "302")), b"", Location=query["to"])
        elif path == "/loop":
            self._send(302, b"", Location="/loop")
        elif path == "/text":
            self._send(200, "héllo".encode(), content_type="text/plain; charset=utf-8")
        elif path == "/mislabelled":
            self._send(200, b"not json", content_type="application/json")
        elif path == "/empty":
            self._send(204)
        elif path == "/big":
            n = int(query["n"])
            if query.get("declared") == "1":
                self._send(200, b"x" * n, content_type="text/plain")
            else:  # no Content-Length: the body runs until the connection closes
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"x" * n)
                except OSError:
                    pass
                self.close_connection = True
        elif path == "/slow":
            time.sleep(2)
            self._json(200, {"slow": True})
        else:
            self._json(404, {"error": "no such path"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[tuple[str, str, str]]


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.requests = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
def base(server: _Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def local_http() -> HttpStep:
    # 127.0.0.1 exempt by name; everything else under the default rules.
    return HttpStep(HttpPolicy(allowed_hosts=frozenset({"127.0.0.1"}), timeout=5.0))


# ---- registry --------------------------------------------------------------------------


def test_default_registry_has_the_builtin_types() -> None:
    registry = default_registry()
    assert registry.names() == BUILTIN_STEP_TYPES == CONTRACT_STEP_TYPES
    assert all(name in registry for name in BUILTIN_STEP_TYPES)


def test_unknown_type_is_a_key_error_naming_the_type() -> None:
    registry = default_registry()
    with pytest.raises(UnknownStepTypeError) as info:
        registry.get("teleport")
    assert isinstance(info.value, KeyError) and isinstance(info.value, StepTypeError)
    assert "teleport" in str(info.value) and "python" in str(info.value)
    assert info.value.field == "type"
    with pytest.raises(UnknownStepTypeError):
        registry.validate_config("teleport", {})


async def test_register_custom_type_and_its_validator(ctx: StepContext) -> None:
    class Shout:
        def validate_config(self, config: Any) -> None:
            if "volume" not in config:
                raise StepTypeError("shout step: with.volume: required", type_name="shout", field="volume")

        async def __call__(self, input: Any, config: Any, ctx: StepContext) -> Any:
            return str(input).upper() * config["volume"]

    registry = StepRegistry()
    registry.register("shout", Shout())
    assert registry.names() == frozenset({"shout"})
    assert await registry.get("shout")("hi", {"volume": 2}, ctx) == "HIHI"
    registry.validate_config("shout", {"volume": 1})
    with pytest.raises(StepTypeError) as info:
        registry.validate_config("shout", {})
    assert info.value.field == "volume"

    with pytest.raises(StepTypeError, match="already registered"):
        registry.register("shout", Shout())
    registry.register("shout", Shout(), replace=True)

    async def plain(input: Any, config: Any, ctx: StepContext) -> Any:
        return input

    registry.register("plain", plain)  # no validate_config: any mapping goes
    registry.validate_config("plain", {"anything": 1})


@pytest.mark.parametrize("name", ["", "has space", "1abc", "a" * 65, "star*", "gt>"])
def test_register_refuses_bad_type_names(name: str) -> None:
    async def handler(input: Any, config: Any, ctx: StepContext) -> Any:
        return input

    with pytest.raises(StepTypeError):
        StepRegistry().register(name, handler)


def test_validate_config_refuses_a_non_mapping() -> None:
    with pytest.raises(StepTypeError, match="mapping") as info:
        default_registry().validate_config("noop", ["not", "a", "mapping"])  # type: ignore[arg-type]
    assert info.value.field is None


@pytest.mark.parametrize(
    ("type_name", "config", "field"),
    [
        ("python", {}, "callable"),
        ("python", {"callable": "no_colon"}, "callable"),
        ("python", {"callable": "pkg.mod:"}, "callable"),
        ("python", {"callable": "pkg..mod:fn"}, "callable"),
        ("python", {"callable": "pkg.mod:fn()"}, "callable"),
        ("python", {"callable": 42}, "callable"),
        ("python", {"callable": "pkg.mod:fn", "args": []}, "args"),
        ("transform", {}, "expression"),
        ("transform", {"expression": "items[?"}, "expression"),
        ("transform", {"expression": ""}, "expression"),
        ("transform", {"expression": 3}, "expression"),
        ("sleep", {"seconds": -1}, "seconds"),
        ("sleep", {"seconds": 86_401}, "seconds"),
        ("sleep", {"seconds": True}, "seconds"),
        ("sleep", {"seconds": "5"}, "seconds"),
        ("sleep", {"seconds": float("nan")}, "seconds"),
        ("sleep", {"secs": 1}, "secs"),
        ("noop", {"x": 1}, "x"),
        ("http", {}, "url"),
        ("http", {"url": 7}, "url"),
        ("http", {"url": "ftp://example.com/"}, "url"),
        ("http", {"url": "file:///etc/passwd"}, "url"),
        ("http", {"url": "example.com/path"}, "url"),
        ("http", {"url": "http:///no-host"}, "url"),
        ("http", {"url": "gopher://${{ input.host }}/"}, "url"),
        ("http", {"url": "https://example.com", "method": "FETCH"}, "method"),
        ("http", {"url": "https://example.com", "method": 1}, "method"),
        ("http", {"url": "https://example.com", "headers": ["a"]}, "headers"),
        ("http", {"url": "https://example.com", "headers": {"X-N": 1}}, "headers"),
        ("http", {"url": "https://example.com", "headers": {"X-A": "a\r\nX-B: b"}}, "headers"),
        ("http", {"url": "https://example.com", "timeout": 0}, "timeout"),
        ("http", {"url": "https://example.com", "timeout": "fast"}, "timeout"),
        ("http", {"url": "https://example.com", "timeout": 10_000}, "timeout"),
        ("http", {"url": "https://example.com", "body": {}}, "body"),
    ],
)
def test_validate_config_errors_name_the_field(type_name: str, config: dict[str, Any], field: str) -> None:
    with pytest.raises(StepTypeError) as info:
        default_registry().validate_config(type_name, config)
    assert info.value.field == field
    assert f"with.{field}" in str(info.value)
    assert type_name in str(info.value)
    assert non_retryable(info.value)


@pytest.mark.parametrize(
    ("type_name", "config"),
    [
        ("python", {"callable": "pkg.mod:fn"}),
        ("python", {"callable": "pkg:Class.method"}),
        ("python", {"callable": "no.such.module:fn"}),  # shape only: nothing is imported
        ("python", {"callable": "${{ input.fn }}"}),
        ("transform", {"expression": "items[?qty > `0`].sku"}),
        ("sleep", {}),
        ("sleep", {"seconds": 0}),
        ("sleep", {"seconds": 86_400}),
        ("sleep", {"seconds": 0.5}),
        ("sleep", {"seconds": "${{ input.delay }}"}),
        ("noop", {}),
        ("http", {"url": "https://example.com/hook"}),
        ("http", {"url": "http://10.0.0.1/"}),  # addresses are checked at run time, by policy
        ("http", {"method": "post", "url": "https://example.com", "headers": {"X-A": "b"}, "timeout": 2.5}),
        ("http", {"url": "https://api.example.com/orders/${{ input.id }}"}),
        ("http", {"url": "${{ input.url }}", "method": "${{ input.method }}"}),
    ],
)
def test_validate_config_accepts_good_configs(type_name: str, config: dict[str, Any]) -> None:
    default_registry().validate_config(type_name, config)


# ---- python ----------------------------------------------------------------------------


async def test_python_sync_callable_runs_in_a_thread(ctx: StepContext) -> None:
    handler = default_registry(step_modules=ALLOWED).get("python")
    out = await handler({"n": 21}, {"callable": f"{SAMPLES}:double"}, ctx)
    assert out["doubled"] == 42
    assert out["thread"] != threading.get_ident()


async def test_python_async_callable_is_awaited_on_the_loop(ctx: StepContext) -> None:
    handler = default_registry(step_modules=ALLOWED).get("python")
    out = await handler({"n": 4}, {"callable": f"{SAMPLES}:async_double"}, ctx)
    assert out == {"doubled": 8, "thread": threading.get_ident()}
    assert await handler(None, {"callable": f"{SAMPLES}:async_object"}, ctx) == {"async_object": True}


async def test_python_ctx_is_passed_through(ctx: StepContext) -> None:
    out = await default_registry(step_modules=ALLOWED).get("python")(None, {"callable": f"{SAMPLES}:context"}, ctx)
    assert out == {"execution_id": "ex-1", "step_id": "s1", "attempt": 2, "idempotency_key": "ex-1:s1", "item": None}


async def test_python_dotted_attribute_and_normalised_output(ctx: StepContext) -> None:
    handler = default_registry(step_modules=ALLOWED).get("python")
    assert await handler("ada", {"callable": f"{SAMPLES}:Greeter.greet"}, ctx) == "hello ada"
    assert await handler(None, {"callable": f"{SAMPLES}:returns_tuple"}, ctx) == [1, "two", None]


@pytest.mark.parametrize(("fn", "type_name"), [("returns_set", "set"), ("returns_object", "object")])
async def test_python_non_json_output_is_refused(ctx: StepContext, fn: str, type_name: str) -> None:
    with pytest.raises(OutputNotJSONError) as info:
        await default_registry(step_modules=ALLOWED).get("python")(None, {"callable": f"{SAMPLES}:{fn}"}, ctx)
    assert non_retryable(info.value)
    assert type_name in str(info.value) and fn in str(info.value)


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("tests.unit.no_such_module:fn", "ModuleNotFoundError"),
        (f"{SAMPLES}:missing", "no attribute"),
        (f"{SAMPLES}:Greeter.missing", "no attribute"),
        (f"{SAMPLES}:NOT_CALLABLE", "not callable"),
    ],
)
async def test_python_bad_callable_path(ctx: StepContext, path: str, needle: str) -> None:
    with pytest.raises(CallableImportError) as info:
        await default_registry(step_modules=ALLOWED).get("python")(None, {"callable": path}, ctx)
    assert non_retryable(info.value)
    assert path in str(info.value) and needle in str(info.value)


async def test_python_malformed_path_at_run_time_is_a_config_error(ctx: StepContext) -> None:
    with pytest.raises(StepTypeError) as info:
        await default_registry(step_modules=ALLOWED).get("python")(None, {"callable": "not a path"}, ctx)
    assert info.value.field == "callable"


async def test_python_exceptions_from_the_callable_propagate(ctx: StepContext) -> None:
    handler = default_registry(step_modules=ALLOWED).get("python")
    with pytest.raises(NonRetryableError, match="card declined"):
        await handler(None, {"callable": f"{SAMPLES}:refuses"}, ctx)
    with pytest.raises(ValueError, match="boom"):
        await handler(None, {"callable": f"{SAMPLES}:async_fails"}, ctx)


async def test_python_imports_once(ctx: StepContext, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = pycall.importlib.import_module

    def counting(name: str, package: str | None = None) -> Any:
        calls.append(name)
        return real(name, package)

    monkeypatch.setattr(pycall.importlib, "import_module", counting)
    handler = default_registry(step_modules=ALLOWED).get("python")
    for n in range(3):
        assert (await handler({"n": n}, {"callable": f"{SAMPLES}:double"}, ctx))["doubled"] == 2 * n
    assert calls == [SAMPLES]


# ---- transform, sleep, noop ------------------------------------------------------------


async def test_transform_evaluates_against_the_input_document(ctx: StepContext) -> None:
    handler = default_registry().get("transform")
    doc = {"items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 0}, {"sku": "c", "qty": 3}]}
    assert await handler(doc, {"expression": "items[?qty > `0`].sku"}, ctx) == ["a", "c"]
    assert await handler(doc, {"expression": "{count: length(items), first: items[0].sku}"}, ctx) == {
        "count": 3,
        "first": "a",
    }
    assert await handler([5, 6], {"expression": "[1]"}, ctx) == 6
    assert await handler(doc, {"expression": "input.items"}, ctx) is None  # no `input.` prefix


async def test_transform_failure_is_non_retryable(ctx: StepContext) -> None:
    with pytest.raises(TransformError) as info:
        await default_registry().get("transform")({"name": "x"}, {"expression": "abs(name)"}, ctx)
    assert non_retryable(info.value)
    assert "abs(name)" in str(info.value)


async def test_transform_over_its_budget_is_non_retryable_and_fast(ctx: StepContext) -> None:
    bomb = "v" + " | [@,@]" * 40  # 2^40 elements if it were built (issue 13)
    started = time.monotonic()
    with pytest.raises(TransformError) as info:
        await default_registry().get("transform")({"v": "x"}, {"expression": bomb}, ctx)
    assert time.monotonic() - started < 1
    assert non_retryable(info.value)
    assert "creates more than 1000000 elements (the expression budget)" in str(info.value)


async def test_sleep_short(ctx: StepContext) -> None:
    handler = default_registry().get("sleep")
    started = time.monotonic()
    assert await handler(None, {"seconds": 0.05}, ctx) == {"slept": 0.05}
    assert time.monotonic() - started >= 0.04
    assert await handler({"seconds": 0}, {}, ctx) == {"slept": 0}


async def test_sleep_input_errors(ctx: StepContext) -> None:
    handler = default_registry().get("sleep")
    with pytest.raises(StepInputError, match="input.seconds"):
        await handler({}, {}, ctx)
    with pytest.raises(StepInputError, match="input.seconds"):
        await handler({"seconds": -3}, {}, ctx)
    with pytest.raises(StepTypeError, match="with.seconds"):
        await handler(None, {"seconds": 100_000}, ctx)


async def test_sleep_is_cancellable(ctx: StepContext) -> None:
    task = asyncio.create_task(default_registry().get("sleep")(None, {"seconds": 3600}, ctx))
    await asyncio.sleep(0.02)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1


async def test_noop_returns_its_input(ctx: StepContext) -> None:
    handler = default_registry().get("noop")
    doc = {"a": [1, 2]}
    assert await handler(doc, {}, ctx) is doc
    assert await handler(None, {}, ctx) is None


# ---- http against a local server -------------------------------------------------------


async def test_http_get_json(local_http: HttpStep, base: str, ctx: StepContext) -> None:
    out = await local_http(None, {"url": f"{base}/json"}, ctx)
    assert out["status"] == 200
    assert out["headers"]["content-type"] == "application/json"
    assert out["body"]["ok"] is True and out["body"]["method"] == "GET"
    assert out["body"]["headers"]["idempotency-key"] == "ex-1:s1"


async def test_http_post_body_params_and_headers(local_http: HttpStep, base: str, ctx: StepContext) -> None:
    out = await local_http(
        {"body": {"order": 7, "tags": ["a"]}, "params": {"q": "x y"}, "headers": {"X-Two": "input"}},
        {"method": "post", "url": f"{base}/echo", "headers": {"X-One": "config", "x-two": "config"}},
        ctx,
    )
    echoed = out["body"]
    assert echoed["method"] == "POST"
    assert echoed["body"] == {"order": 7, "tags": ["a"]}
    assert echoed["query"] == {"q": "x y"}
    assert echoed["headers"]["content-type"] == "application/json"
    assert echoed["headers"]["x-one"] == "config"
    assert echoed["headers"]["x-two"] == "input"  # input headers win over with.headers
    assert echoed["headers"]["idempotency-key"] == "ex-1:s1"


async def test_http_explicit_idempotency_key_wins(local_http: HttpStep, base: str, ctx: StepContext) -> None:
    out = await local_http({"headers": {"idempotency-key": "mine"}}, {"url": f"{base}/json"}, ctx)
    assert out["body"]["headers"]["idempotency-key"] == "mine"


async def test_http_text_empty_and_mislabelled_bodies(local_http: HttpStep, base: str, ctx: StepContext) -> None:
    assert (await local_http(None, {"url": f"{base}/text"}, ctx))["body"] == "héllo"
    empty = await local_http(None, {"url": f"{base}/empty"}, ctx)
    assert empty["status"] == 204 and empty["body"] is None
    assert (await local_http(None, {"url": f"{base}/mislabelled"}, ctx))["body"] == "not json"


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_http_5xx_is_retryable(local_http: HttpStep, base: str, ctx: StepContext, status: int) -> None:
    with pytest.raises(HttpRetryableStatus) as info:
        await local_http(None, {"url": f"{base}/status/{status}"}, ctx)
    assert isinstance(info.value, RetryableError) and not non_retryable(info.value)
    assert info.value.status == status
    assert str(status) in str(info.value) and "127.0.0.1" in str(info.value)
    assert info.value.next_retry_delay is None


async def test_http_429_honours_retry_after(local_http: HttpStep, base: str, ctx: StepContext) -> None:
    with pytest.raises(HttpRetryableStatus) as info:
        await local_http(None, {"url": f"{base}/status/429?retry_after=7"}, ctx)
    assert info.value.status == 429 and info.value.next_retry_delay == 7
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    with pytest.raises(HttpRetryableStatus) as info:
        await local_http(None, {"url": f"{base}/status/503?retry_after={when}"}, ctx)
    assert info.value.next_retry_delay is not None and 100 < info.value.next_retry_delay <= 120


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_http_4xx_is_non_retryable(local_http: HttpStep, base: str, ctx: StepContext, status: int) -> None:
    with pytest.raises(HttpClientError) as info:
        await local_http(None, {"url": f"{base}/status/{status}"}, ctx)
    assert non_retryable(info.value)
    assert info.value.status == status and str(status) in str(info.value)
    assert info.value.body == {"error": f"status {status}"}


@pytest.mark.parametrize("declared", ["0", "1"])
async def test_http_response_size_is_capped(base: str, ctx: StepContext, declared: str) -> None:
    step = HttpStep(HttpPolicy(allowed_hosts=frozenset({"127.0.0.1"}), max_response_bytes=1000))
    assert (await step(None, {"url": f"{base}/big?n=1000&declared={declared}"}, ctx))["body"] == "x" * 1000
    with pytest.raises(ResponseTooLarge) as info:
        await step(None, {"url": f"{base}/big?n=200000&declared={declared}"}, ctx)
    assert non_retryable(info.value)


async def test_http_timeout_is_retryable(local_http: HttpStep, base: str, ctx: StepContext) -> None:
    started = time.monotonic()
    with pytest.raises(HttpTransportError) as info:
        await local_http(None, {"url": f"{base}/slow", "timeout": 0.2}, ctx)
    assert time.monotonic() - started < 1.5
    assert isinstance(info.value, RetryableError) and not non_retryable(info.value)


async def test_http_connection_refused_is_retryable(local_http: HttpStep, ctx: StepContext) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(HttpTransportError) as info:
        await local_http(None, {"url": f"http://127.0.0.1:{port}/"}, ctx)
    assert not non_retryable(info.value)


async def test_http_input_must_be_a_mapping(local_http: HttpStep, base: str, ctx: StepContext) -> None:
    with pytest.raises(StepInputError):
        await local_http(["body"], {"url": f"{base}/json"}, ctx)
    with pytest.raises(StepInputError, match="input.params"):
        await local_http({"params": "q=1"}, {"url": f"{base}/json"}, ctx)


async def test_http_unrendered_templates_are_refused_at_run_time(
    local_http: HttpStep, base: str, ctx: StepContext
) -> None:
    for config, field in (
        ({"url": f"{base}/json", "method": "${{ input.m }}"}, "method"),
        ({"url": f"{base}/json", "timeout": "${{ input.t }}"}, "timeout"),
        ({"url": f"{base}/json", "headers": "${{ input.h }}"}, "headers"),
    ):
        with pytest.raises(StepTypeError) as info:
            await local_http(None, config, ctx)
        assert info.value.field == field


# ---- redirects -------------------------------------------------------------------------


async def test_http_follows_a_local_redirect(local_http: HttpStep, base: str, ctx: StepContext) -> None:
    out = await local_http(None, {"url": f"{base}/redirect?to=/json"}, ctx)
    assert out["status"] == 200 and out["body"]["path"] == "/json"


async def test_http_303_turns_post_into_get(local_http: HttpStep, base: str, ctx: StepContext) -> None:
    out = await local_http({"body": {"a": 1}}, {"method": "POST", "url": f"{base}/redirect?code=303&to=/echo"}, ctx)
    assert out["body"]["method"] == "GET" and out["body"]["body"] is None
    out = await local_http({"body": {"a": 1}}, {"method": "POST", "url": f"{base}/redirect?code=307&to=/echo"}, ctx)
    assert out["body"]["method"] == "POST" and out["body"]["body"] == {"a": 1}


async def test_http_redirect_limit(base: str, ctx: StepContext) -> None:
    step = HttpStep(HttpPolicy(allowed_hosts=frozenset({"127.0.0.1"}), max_redirects=3))
    with pytest.raises(TooManyRedirects) as info:
        await step(None, {"url": f"{base}/loop"}, ctx)
    assert non_retryable(info.value) and "3" in str(info.value)


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("http://10.0.0.1/", "10.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[::ffff:169.254.169.254]/", "::ffff:169.254.169.254"),
        ("http://192.168.1.1:8080/admin", "192.168.1.1"),
        ("http://localhost:{port}/json", "localhost"),  # 127.0.0.1 is allowed by name, not localhost
    ],
)
async def test_http_redirect_to_a_private_address_is_refused(
    local_http: HttpStep, server: _Server, base: str, ctx: StepContext, target: str, host: str
) -> None:
    target = target.format(port=server.server_address[1])
    before = len(server.requests)
    with pytest.raises(SsrfBlocked) as info:
        await local_http(None, {"url": f"{base}/redirect?to={target}"}, ctx)
    assert non_retryable(info.value)
    assert info.value.host == host and host in str(info.value)
    assert len(server.requests) == before + 1  # only the first hop was made


async def test_http_redirect_to_another_scheme_is_refused(local_http: HttpStep, base: str, ctx: StepContext) -> None:
    with pytest.raises(SsrfBlocked, match="scheme 'file'"):
        await local_http(None, {"url": f"{base}/redirect?to=file:///etc/passwd"}, ctx)


async def test_http_cross_origin_redirect_drops_credentials(server: _Server, base: str, ctx: StepContext) -> None:
    step = HttpStep(HttpPolicy(allowed_hosts=frozenset({"127.0.0.1", "localhost"})))
    port = server.server_address[1]
    same = await step(
        {"headers": {"Authorization": "Bearer s3cret"}}, {"url": f"{base}/redirect?to=/json"}, ctx
    )
    assert same["body"]["headers"]["authorization"] == "Bearer s3cret"
    other = await step(
        {"headers": {"Authorization": "Bearer s3cret"}},
        {"url": f"{base}/redirect?to=http://localhost:{port}/json"},
        ctx,
    )
    assert "authorization" not in other["body"]["headers"]
    assert other["body"]["headers"]["idempotency-key"] == "ex-1:s1"


# ---- the SSRF guard --------------------------------------------------------------------


BLOCKED_URLS = [
    "http://127.0.0.1",
    "http://localhost",
    "http://10.0.0.1",
    "http://192.168.1.1",
    "http://172.16.0.1",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]",
    "http://[::ffff:127.0.0.1]",
    "http://0.0.0.0",
    "file:///etc/passwd",
    "ftp://x",
    "gopher://x",
    # the same targets in other spellings
    "HTTP://127.0.0.1/",
    "http://127.0.0.1.:8080/",
    "http://2130706433/",
    "http://0x7f.0.0.1/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://user:pw@10.0.0.1/",
    "https://[::ffff:a9fe:a9fe]/",
    "http://[::ffff:10.0.0.1]:8080/",
    "http://[2002:7f00:1::]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[fd00:ec2::254]/latest/meta-data",
    "http://100.100.100.200/latest/meta-data",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://100.64.0.1/",
    "http://255.255.255.255/",
    "http:///no-host",
    "javascript:alert(1)",
    "data:text/plain,hi",
]


@pytest.mark.parametrize("url", BLOCKED_URLS)
async def test_ssrf_matrix_refused_by_default(url: str, ctx: StepContext) -> None:
    with pytest.raises(SsrfBlocked) as info:
        await check_url(url, HttpPolicy())
    assert non_retryable(info.value)
    assert info.value.reason in str(info.value)
    # ... and the step refuses it the same way, before connecting anywhere.
    with pytest.raises(SsrfBlocked):
        await default_registry().get("http")(None, {"url": url}, ctx)


@pytest.mark.parametrize(
    ("url", "host", "reason"),
    [
        ("http://10.0.0.1/", "10.0.0.1", "private"),
        ("http://169.254.169.254/", "169.254.169.254", "metadata"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1", "loopback"),
        ("http://0.0.0.0/", "0.0.0.0", "unspecified"),
        ("ftp://x/", "", "scheme 'ftp'"),
    ],
)
async def test_ssrf_refusal_names_host_and_reason(url: str, host: str, reason: str) -> None:
    with pytest.raises(SsrfBlocked) as info:
        await check_url(url)
    assert info.value.host == host
    assert reason in info.value.reason and reason in str(info.value)
    assert (host or url.split(":")[0]) in str(info.value)


def fake_resolver(table: dict[str, list[str]], calls: list[tuple[str, int]] | None = None) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        return table[host]

    return resolve


async def test_public_host_passes_the_check() -> None:
    calls: list[tuple[str, int]] = []
    resolver = fake_resolver({"api.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]}, calls)
    addresses = await check_url("https://api.example.com/v1/orders?x=1", HttpPolicy(), resolver=resolver)
    assert addresses == ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]
    assert calls == [("api.example.com", 443)]
    assert await check_url("http://8.8.8.8:8080/", HttpPolicy(), resolver=resolver) == ["8.8.8.8"]


async def test_one_private_address_among_public_ones_is_refused() -> None:
    resolver = fake_resolver({"mixed.example.com": ["93.184.216.34", "10.1.2.3"]})
    with pytest.raises(SsrfBlocked, match=r"10\.1\.2\.3 is a private address") as info:
        await check_url("https://mixed.example.com/", resolver=resolver)
    assert info.value.host == "mixed.example.com"


async def test_a_name_that_resolves_to_metadata_is_refused() -> None:
    resolver = fake_resolver({"metadata.google.internal": ["169.254.169.254"]})
    with pytest.raises(SsrfBlocked, match="metadata"):
        await check_url("http://metadata.google.internal/computeMetadata/v1/", resolver=resolver)


async def test_no_addresses_is_a_retryable_resolution_error() -> None:
    with pytest.raises(HostResolutionError) as info:
        await check_url("https://gone.example.com/", resolver=fake_resolver({"gone.example.com": []}))
    assert not non_retryable(info.value)


async def test_allowed_hosts_are_exempt_by_name() -> None:
    async def must_not_resolve(host: str, port: int) -> list[str]:
        raise AssertionError("an exempt host is not resolved by the check")

    policy = HttpPolicy(allowed_hosts=frozenset({"Internal.SVC.", "10.0.0.1", "[::1]"}))
    assert await check_url("http://internal.svc:8080/x", policy, resolver=must_not_resolve) == []
    assert await check_url("http://10.0.0.1/", policy, resolver=must_not_resolve) == []
    assert await check_url("http://[::1]/", policy, resolver=must_not_resolve) == []
    with pytest.raises(SsrfBlocked):
        await check_url("http://10.0.0.2/", policy)
    with pytest.raises(SsrfBlocked, match="scheme"):  # exemption is about addresses, not schemes
        await check_url("ftp://internal.svc/", policy)


async def test_allow_private_lets_private_addresses_through() -> None:
    policy = HttpPolicy(allow_private=True)
    assert await check_url("http://10.0.0.1/", policy) == []
    with pytest.raises(SsrfBlocked):
        await check_url("file:///etc/passwd", policy)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("127.0.0.1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.31.255.255", "private"),
        ("fc00::1", "private"),
        ("169.254.1.1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("168.63.129.16", "metadata"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("239.1.1.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not a globally routable"),
        ("2002:a00:1::", "private"),  # 6to4 around 10.0.0.1
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 around 127.0.0.1
        ("not-an-ip", "not an IP address"),
    ],
)
def test_address_problem(address: str, problem: str | None) -> None:
    found = address_problem(address)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


async def test_dns_rebinding_between_check_and_connect_is_refused(
    server: _Server, ctx: StepContext
) -> None:
    # The first lookup (the pre-request check) answers a public address, the
    # second (at connect) the loopback the attacker wants: the connect-time
    # check refuses it, and nothing reaches the server.
    port = server.server_address[1]
    answers = [["93.184.216.34"], ["127.0.0.1"]]
    calls: list[tuple[str, int]] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return answers[min(len(calls), len(answers)) - 1]

    before = len(server.requests)
    step = HttpStep(HttpPolicy(), resolver=rebinding)
    with pytest.raises(SsrfBlocked, match="loopback"):
        await step(None, {"url": f"http://rebind.example.com:{port}/json"}, ctx)
    assert calls == [("rebind.example.com", port), ("rebind.example.com", port)]
    assert len(server.requests) == before


async def test_connection_goes_to_the_checked_address_with_the_original_host(
    server: _Server, ctx: StepContext
) -> None:
    # `pinned.example.com` exists only in our resolver: the request can only
    # arrive if the transport connected to the address the guard resolved,
    # while the URL (and so the Host header) kept the name.
    port = server.server_address[1]
    step = HttpStep(HttpPolicy(allow_private=True), resolver=fake_resolver({"pinned.example.com": ["127.0.0.1"]}))
    out = await step(None, {"url": f"http://pinned.example.com:{port}/json"}, ctx)
    assert out["status"] == 200
    assert out["body"]["headers"]["host"] == f"pinned.example.com:{port}"
    assert server.requests[-1][2] == f"pinned.example.com:{port}"


async def test_connect_falls_back_to_the_next_checked_address(server: _Server, ctx: StepContext) -> None:
    # Nothing listens on [::1] at the server's port: the first address fails, the second answers.
    port = server.server_address[1]
    step = HttpStep(
        HttpPolicy(allow_private=True),
        resolver=fake_resolver({"multi.example.com": ["::1", "127.0.0.1"]}),
    )
    out = await step(None, {"url": f"http://multi.example.com:{port}/json"}, ctx)
    assert out["status"] == 200


# ---- small pure pieces -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("999999999", 86_400.0),
        ("soon", None),
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Tue, 01 Jan 2030 12:00:30 GMT", now=now) == 30.0


def test_http_policy_checks_and_normalises() -> None:
    policy = HttpPolicy(allowed_hosts={"API.Example.com.", "[::1]"})  # type: ignore[arg-type]
    assert policy.allowed_hosts == frozenset({"api.example.com", "::1"})
    with pytest.raises(TypeError):
        HttpPolicy(allowed_hosts="localhost")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HttpPolicy(max_redirects=-1)
    with pytest.raises(ValueError):
        HttpPolicy(timeout=0)
    with pytest.raises(ValueError):
        HttpPolicy(max_response_bytes=0)
