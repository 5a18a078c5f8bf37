"""What step code may run and what it may see: the module allowlist, secret references and
their redaction, and the `http` step's credential rules (issue 14, items 1, 4 and 6)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from contracts import secrets as refs
from contracts.definitions import DefinitionError, parse_definition
from contracts.expressions import render
from contracts.messages import StepError, StepReady
from services.orchestrator.decide import Start, decide
from services.orchestrator.relay import to_message
from services.orchestrator.state import Execution, evolve
from services.worker.secrets import MissingSecret, Secret, SecretSource
from services.worker.steps import (
    CallableNotAllowed,
    HttpPolicy,
    HttpStep,
    PythonStep,
    StepModules,
    StepTypeError,
    discover,
)
from services.worker.steps.allowlist import parse_modules, refused_callables
from services.worker.steps.ssrf import AddressGuard, SsrfBlocked, parse_allowed_hosts
from weft import StepContext

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def ctx() -> StepContext:
    return StepContext(execution_id="ex-1", step_id="s1", attempt=1, idempotency_key="ex-1:s1", item=None)


# ---- the module allowlist ---------------------------------------------------------------------

ATTACKS = ["os:system", "subprocess:run", "cProfile:run", "pty:spawn", "shutil:rmtree", "builtins:exec",
           "profile:run", "importlib:import_module"]


def test_parse_modules_splits_trims_and_names_a_bad_one() -> None:
    assert parse_modules(" shop.steps, billing ,,shop.steps") == ("shop.steps", "billing")
    with pytest.raises(ValueError, match="'shop-steps' is not a module name"):
        parse_modules("shop-steps")


def test_a_module_allows_its_submodules_only() -> None:
    modules = StepModules(("shop", "billing.steps"))
    assert modules.allows("shop") and modules.allows("shop.steps.deep")
    assert modules.allows("billing.steps") and not modules.allows("billing")
    assert not modules.allows("shopping") and not modules.allows("os")


@pytest.mark.parametrize("path", ATTACKS)
async def test_stdlib_callables_are_refused_before_any_import(
    path: str, ctx: StepContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imported: list[str] = []
    monkeypatch.setattr("importlib.import_module", lambda name, package=None: imported.append(name))
    victim = tmp_path / "victim"
    victim.mkdir()
    step = PythonStep(StepModules(("tests.unit",)))
    with pytest.raises(CallableNotAllowed) as info:
        await step(str(victim), {"callable": path}, ctx)
    assert info.value.non_retryable
    assert "WEFT_STEP_MODULES" in str(info.value) and path in str(info.value)
    assert imported == [] and victim.is_dir()


async def test_the_attacks_do_run_when_their_module_is_named_explicitly(ctx: StepContext, tmp_path: Path) -> None:
    # The control for the refusals above and in tests/integration/test_step_security.py:
    # these calls, as a python step makes them, really do delete and execute.
    victim = tmp_path / "victim"
    victim.mkdir()
    marker = tmp_path / "marker"
    step = PythonStep(StepModules(("shutil", "cProfile")))
    await step(str(victim), {"callable": "shutil:rmtree"}, ctx)
    assert not victim.exists()
    with pytest.raises(TypeError):  # cProfile.run(statement, filename=ctx) runs, then cannot write its stats
        await step(f"open({str(marker)!r}, 'w').close()", {"callable": "cProfile:run"}, ctx)
    assert marker.exists()


@pytest.mark.parametrize("path", [
    "tests.unit.test_step_security:sys.exit",  # through a module an allowed module imported
    "tests.unit.test_step_security:orjson.dumps",
    "tests.unit.test_step_security:refs.substitute",
    "tests.unit.test_step_security:render",  # defined in contracts.expressions, merely imported here
    "tests.unit.test_step_security:Path.unlink",
    "tests.unit.test_step_security:__loader__.load_module",
    "tests.unit.test_step_security:__builtins__",
])
async def test_an_allowed_module_does_not_open_what_it_imported(path: str, ctx: StepContext) -> None:
    step = PythonStep(StepModules(("tests.unit.test_step_security",)))
    with pytest.raises(CallableNotAllowed):
        await step(None, {"callable": path}, ctx)


def allowed_here(input: Any, ctx: StepContext) -> Any:
    return {"echo": input}


async def test_a_callable_defined_in_an_allowed_module_runs(ctx: StepContext) -> None:
    step = PythonStep(StepModules(("tests.unit",)))
    assert await step(7, {"callable": "tests.unit.test_step_security:allowed_here"}, ctx) == {"echo": 7}


async def test_no_allowlist_means_nothing_is_callable(ctx: StepContext) -> None:
    with pytest.raises(CallableNotAllowed, match=r"allowed step modules \(none\)"):
        await PythonStep()(None, {"callable": "tests.unit.test_step_security:allowed_here"}, ctx)


def test_discover_finds_the_project_and_skips_stdlib_installed_and_venvs(tmp_path: Path) -> None:
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "jobs.py").write_text("")
    (tmp_path / "subprocess.py").write_text("")  # the standard library's name: never discovered
    (tmp_path / "pydantic").mkdir()  # an installed distribution's name
    (tmp_path / "pydantic" / "__init__.py").write_text("")
    for hidden in (".venv", "venv", "node_modules", "__pycache__", ".git"):
        (tmp_path / hidden).mkdir()
        (tmp_path / hidden / "x.py").write_text("")
    (tmp_path / "env2").mkdir()
    (tmp_path / "env2" / "pyvenv.cfg").write_text("")
    (tmp_path / "env2" / "a.py").write_text("")
    (tmp_path / "docs").mkdir()  # no Python inside
    (tmp_path / "not-a-module.py").write_text("")
    assert discover(tmp_path) == ("jobs", "shop")


def test_discover_keeps_the_project_installed_in_editable_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "myproj").mkdir()
    (tmp_path / "myproj" / "__init__.py").write_text("")
    info = tmp_path / "myproj-1.0.dist-info"  # `pip install -e .` of the project: its code stays here
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myproj\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("myproj\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "myproj" in __import__("importlib.metadata").metadata.packages_distributions()
    assert discover(tmp_path) == ("myproj",)


def test_publishers_that_know_the_allowlist_warn() -> None:
    wf = parse_definition({"name": "w", "steps": [
        {"id": "a", "type": "python", "with": {"callable": "os:system"}},
        {"id": "b", "type": "python", "with": {"callable": "examples.shop:reserve"}},
    ]})
    warnings = refused_callables(wf, StepModules(("examples",)))
    assert len(warnings) == 1 and "'os:system'" in warnings[0] and "WEFT_STEP_MODULES" in warnings[0]


# ---- secret references (contracts) -------------------------------------------------------------


def test_render_leaves_secret_references_to_the_worker() -> None:
    ctx = {"input": {"x": 1}, "secrets": {"T": "leaked"}}
    template = {"a": "${{ secrets.T }}", "b": "Bearer ${{ secrets.T }}", "c": "${{ input.x }}"}
    assert render(template, ctx) == {"a": "${{ secrets.T }}", "b": "Bearer ${{ secrets.T }}", "c": 1}
    assert render("${{ input.secrets }}", {"input": {"secrets": 5}}) == 5  # a field called secrets is data


def test_locate_substitute_and_set_at() -> None:
    template = {"h": {"Authorization": "Bearer ${{ secrets.T }}", "a/b": "${{ secrets.U }}"}, "l": ["x", "${{secrets.V}}"]}
    found = refs.locate(template, "/config")
    assert found == {"/config/h/Authorization": "Bearer ${{ secrets.T }}", "/config/h/a~1b": "${{ secrets.U }}",
                     "/config/l/1": "${{secrets.V}}"}
    doc = {"config": orjson.loads(orjson.dumps(template))}
    for pointer, text in found.items():
        assert refs.set_at(doc, pointer, refs.substitute(text, str.lower))
    assert doc["config"] == {"h": {"Authorization": "Bearer t", "a/b": "u"}, "l": ["x", "v"]}
    assert not refs.set_at(doc, "/config/gone/x", "v")


@pytest.mark.parametrize(("template", "needle"), [
    ({"k": "${{ secrets }}"}, "cannot be used inside another expression"),
    ({"k": "${{ keys(secrets) }}"}, "cannot be used inside another expression"),
    ({"k": "${{ secrets.A || input.x }}"}, "cannot be used inside another expression"),
    ({"k": "${{ secrets.A }}-${{ input.x }}"}, "may hold only secrets and plain text"),
    ({"k": "${{ secrets.bad-name }}"}, "cannot be used inside another expression"),
])
def test_secret_reference_rules(template: Any, needle: str) -> None:
    problems = refs.problems(template)
    assert problems and needle in problems[0]


@pytest.mark.parametrize("header", ["Authorization", "proxy-authorization", "Cookie", "X-API-Key"])
def test_a_literal_credential_header_is_refused_at_publish_with_the_secret_form(header: str) -> None:
    body = {"name": "w", "steps": [{"id": "a", "type": "http",
                                    "with": {"url": "https://api.example.com", "headers": {header: "abc123"}}}]}
    with pytest.raises(DefinitionError) as info:
        parse_definition(body)
    assert f"steps[0].with.headers.{header}" in str(info.value) and "${{ secrets." in str(info.value)
    body["steps"][0]["with"]["headers"][header] = "${{ input.token }}"  # data is not a secret either
    with pytest.raises(DefinitionError):
        parse_definition(body)
    body["steps"][0]["with"]["headers"][header] = "Bearer ${{ secrets.API_TOKEN }}"
    assert parse_definition(body).steps[0].secret_refs == {f"/config/headers/{header}": "Bearer ${{ secrets.API_TOKEN }}"}


def test_secrets_only_in_with_and_input() -> None:
    for where in ({"when": "${{ secrets.A }}"}, {"map": "${{ secrets.A }}"}):
        with pytest.raises(DefinitionError, match="secrets can be used only"):
            parse_definition({"name": "w", "steps": [{"id": "a", "type": "noop", **where}]})
    with pytest.raises(DefinitionError, match="output"):
        parse_definition({"name": "w", "steps": [{"id": "a", "type": "noop"}], "output": "${{ secrets.A }}"})


def test_decide_renders_with_and_carries_only_references() -> None:
    wf = parse_definition({"name": "w", "steps": [{
        "id": "call", "type": "http",
        "with": {"url": "${{ input.url }}", "headers": {"Authorization": "Bearer ${{ secrets.T }}"}},
        "input": {"body": {"token": "${{ secrets.T }}", "who": "${{ input.who }}"}},
    }]})
    state = Execution(id="ex-1")
    events = decide(state, Start(wf, 1, wf.content_hash(), input={"url": "https://a.example/x", "who": "${{ secrets.T }}"}), NOW)
    scheduled = [e for e in events if e.type == "StepScheduled"][0]
    assert scheduled.config == {"url": "https://a.example/x", "headers": {"Authorization": "Bearer ${{ secrets.T }}"}}
    assert scheduled.secrets == {"/config/headers/Authorization": "Bearer ${{ secrets.T }}",
                                 "/input/body/token": "${{ secrets.T }}"}
    for e in events:
        evolve(state, e)
    ready = StepReady.model_validate_json(to_message(_record(scheduled)).data)
    assert ready.secrets == scheduled.secrets
    # The input's own "${{ secrets.T }}" is data: it is not at a place the definition put a secret.
    resolved = SecretSource(environ={"WEFT_SECRET_T": "tok-123"}).resolve(ready)
    assert resolved.config["headers"]["Authorization"] == "Bearer tok-123"
    assert isinstance(resolved.config["headers"]["Authorization"], Secret)
    assert resolved.input["body"] == {"token": "tok-123", "who": "${{ secrets.T }}"}
    assert ready.config["headers"]["Authorization"] == "Bearer ${{ secrets.T }}"  # the message kept the reference


def _record(event: Any) -> Any:
    class Rec:  # what the relay reads of a StoredRecord
        stream_id = "ex-1"
        type = event.type
        data = orjson.dumps(event.model_dump(mode="json"))

    return Rec()


# ---- secrets on the worker ---------------------------------------------------------------------


def _ready(secrets: dict[str, str], config: Any = None, input: Any = None) -> StepReady:
    return StepReady(execution_id="e", workflow="w", step_id="s", attempt=1, step_type="noop", config=config or {},
                     input=input, idempotency_key="e:s", scheduled_at=NOW, secrets=secrets)


def test_secrets_come_from_the_environment_then_the_folder(tmp_path: Path) -> None:
    (tmp_path / "B").write_text("from-file\n")
    (tmp_path / "A").write_text("file-loses")
    source = SecretSource(tmp_path, environ={"WEFT_SECRET_A": "from-env"})
    assert source.get("A") == "from-env" and source.get("B") == "from-file"
    with pytest.raises(MissingSecret) as info:
        source.get("C")
    assert "'C'" in str(info.value) and "WEFT_SECRET_C" in str(info.value) and info.value.non_retryable
    (tmp_path / "BIG").write_bytes(b"x" * (64 * 1024 + 5))
    with pytest.raises(MissingSecret, match="larger than"):
        source.get("BIG")
    (tmp_path / "BAD").write_bytes(b"\xff\xfe")
    with pytest.raises(MissingSecret, match="not UTF-8"):
        source.get("BAD")


def test_a_missing_secret_names_the_secret_not_a_value() -> None:
    with pytest.raises(MissingSecret) as info:
        SecretSource(environ={"WEFT_SECRET_OTHER": "v4lue"}).resolve(_ready({"/input/k": "${{ secrets.NOPE }}"},
                                                                            input={"k": "${{ secrets.NOPE }}"}))
    assert "NOPE" in str(info.value) and "v4lue" not in str(info.value)


def test_what_comes_back_is_redacted() -> None:
    source = SecretSource(environ={"WEFT_SECRET_T": "hunter22", "WEFT_SECRET_LONG": "hunter22-and-more"})
    resolved = source.resolve(_ready({"/input/a": "${{ secrets.T }}", "/input/b": "x ${{ secrets.LONG }}"},
                                     input={"a": "", "b": ""}))
    out = resolved.redact({"said": "it was hunter22-and-more / hunter22", "hunter22": [1, "hunter22"]})
    assert out == {"said": "it was *** / ***", "***": [1, "***"]}
    err = resolved.redact_error(StepError(type="E", message="bad hunter22", traceback="line hunter22"))
    assert err is not None and err.message == "bad ***" and err.traceback == "line ***"
    assert repr(Secret("hunter22")) == "Secret('***')"


# ---- the http step ------------------------------------------------------------------------------


class _Echo(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = orjson.dumps({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def echo() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


async def test_cross_origin_redirects_drop_credentials_and_secret_headers(echo: int, ctx: StepContext) -> None:
    step = HttpStep(HttpPolicy(allowed_hosts=frozenset({"127.0.0.1", "localhost"})))
    config = {"url": "", "headers": {"Authorization": Secret("Bearer t0k"), "X-Api-Key": Secret("k3y"),
                                     "X-Custom-Sig": Secret("s1g"), "X-Plain": "kept"}}
    same = await step(None, {**config, "url": f"http://127.0.0.1:{echo}/redirect?to=/h"}, ctx)
    assert same["body"]["authorization"] == "Bearer t0k" and same["body"]["x-custom-sig"] == "s1g"
    other = await step(None, {**config, "url": f"http://127.0.0.1:{echo}/redirect?to=http://localhost:{echo}/h"}, ctx)
    assert {"authorization", "x-api-key", "x-custom-sig"}.isdisjoint(other["body"])
    assert other["body"]["x-plain"] == "kept"
    # Input headers (the step's data) that carry credentials are dropped too.
    data = await step({"headers": {"Cookie": "sid=1", "X-API-Key": "k"}},
                      {"url": f"http://127.0.0.1:{echo}/redirect?to=http://localhost:{echo}/h"}, ctx)
    assert {"cookie", "x-api-key"}.isdisjoint(data["body"])


async def test_a_credential_header_that_is_not_a_resolved_secret_is_refused(echo: int, ctx: StepContext) -> None:
    step = HttpStep(HttpPolicy(allow_private=True))
    with pytest.raises(StepTypeError) as info:
        await step(None, {"url": f"http://127.0.0.1:{echo}/h", "headers": {"Authorization": "Bearer literal"}}, ctx)
    assert info.value.field == "headers.Authorization" and "${{ secrets." in str(info.value)


async def test_auth_builds_the_header_from_secrets(echo: int, ctx: StepContext) -> None:
    step = HttpStep(HttpPolicy(allow_private=True))
    url = f"http://127.0.0.1:{echo}/h"
    bearer = await step(None, {"url": url, "auth": {"bearer": Secret("t0k")}}, ctx)
    assert bearer["body"]["authorization"] == "Bearer t0k"
    basic = await step(None, {"url": url, "auth": {"username": "ada", "password": Secret("pw")}}, ctx)
    assert basic["body"]["authorization"] == "Basic YWRhOnB3"
    with pytest.raises(StepTypeError, match="auth.password"):
        step.validate_config({"url": url, "auth": {"username": "ada", "password": "pw"}})
    step.validate_config({"url": url, "auth": {"username": "ada", "password": "${{ secrets.PW }}"}})


def test_allowed_hosts_take_ports() -> None:
    assert parse_allowed_hosts("Billing.Internal., api:8443, [::1]:80") == ("billing.internal", "api:8443", "[::1]:80")
    with pytest.raises(ValueError, match="bad port"):
        parse_allowed_hosts("api:99999")
    guard = AddressGuard(HttpPolicy(allowed_hosts=frozenset({"127.0.0.1:8080"})))
    assert guard.exempt("127.0.0.1", 8080) and not guard.exempt("127.0.0.1", 8081)


async def test_an_allowed_host_port_reaches_only_that_port(echo: int, ctx: StepContext) -> None:
    step = HttpStep(HttpPolicy(allowed_hosts=frozenset(parse_allowed_hosts(f"127.0.0.1:{echo}"))))
    assert (await step(None, {"url": f"http://127.0.0.1:{echo}/h"}, ctx))["status"] == 200
    with pytest.raises(SsrfBlocked, match="loopback"):
        await step(None, {"url": f"http://127.0.0.1:{echo + 1 if echo < 65535 else echo - 1}/h"}, ctx)


def test_the_settings_take_the_new_fields(tmp_path: Path) -> None:
    from services.settings import Settings

    s = Settings.load(env={"WEFT_STEP_MODULES": "shop.steps, billing", "WEFT_SECRETS_DIR": str(tmp_path),
                           "WEFT_HTTP_ALLOWED_HOSTS": "a.internal,b:8443", "WEFT_HOME": str(tmp_path)})
    assert s.step_modules == "shop.steps,billing" and s.secrets_dir == tmp_path
    assert s.http_allowed_hosts == "a.internal,b:8443"
    with pytest.raises(ValueError, match="WEFT_STEP_MODULES"):
        Settings.load(env={"WEFT_STEP_MODULES": "rm -rf", "WEFT_HOME": str(tmp_path)})
    assert "sys" in sys.modules  # (keeps the `sys` import used for the traversal case above)


def test_a_secret_in_the_url_is_refused_at_publish_and_at_run_time() -> None:
    with pytest.raises(DefinitionError, match="cannot be part of the URL"):
        parse_definition({"name": "w", "steps": [
            {"id": "a", "type": "http", "with": {"url": "https://api.example.com/?key=${{ secrets.K }}"}}]})
    with pytest.raises(StepTypeError, match="cannot be part of the URL"):
        HttpStep()._check_config({"url": Secret("https://api.example.com/?key=v")}, static=False)


def test_entry_points_of_group_weft_steps_are_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real installed distribution's metadata, as pip writes it, found on sys.path.
    info = tmp_path / "acme_steps-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-steps\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[weft.steps]\nacme = acme_steps.jobs\nbilling = acme_billing.tasks:charge\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = StepModules.build(["shop"])
    assert modules.names == ("shop", "acme_steps.jobs", "acme_billing.tasks")
    assert modules.allows("acme_steps.jobs") and not modules.allows("acme_steps")
    assert StepModules.build(["shop"], entry_points=False).names == ("shop",)


def test_a_retry_keeps_the_rendered_with_of_its_map_item() -> None:
    from contracts.messages import StepResult

    wf = parse_definition({"name": "w", "steps": [
        {"id": "each", "type": "http", "map": "${{ input.urls }}", "with": {"url": "${{ item }}"},
         "retry": {"max_attempts": 2, "initial_delay": 0, "jitter": False}}]})
    state = Execution(id="ex-1")
    urls = ["https://a.example/1", "https://b.example/2"]
    first = decide(state, Start(wf, 1, wf.content_hash(), input={"urls": urls}), NOW)
    for e in first:
        evolve(state, e)
    assert [e.config["url"] for e in first if e.type == "StepScheduled"] == urls
    failed = StepResult(execution_id="ex-1", step_id="each", item=1, attempt=1, status="failed",
                        error=StepError(type="HttpTransportError", message="down"))
    retry = [e for e in decide(state, failed, NOW) if e.type == "StepScheduled"]
    assert [(e.item, e.attempt, e.config["url"]) for e in retry] == [(1, 2, urls[1])]
