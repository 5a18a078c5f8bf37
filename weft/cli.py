"""The `weft` command line.

Exit codes: 0 success, 1 the execution (or operation) failed, 2 bad input.
Every command that reports takes --json and then prints JSON only.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any, Optional

import orjson
import typer

from weft import output as out

app = typer.Typer(no_args_is_help=True, add_completion=True, help="Weft: event-sourced workflow orchestration.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"weft {version('weft')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("weft (not installed)")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit."),
) -> None:
    """Weft: event-sourced workflow orchestration."""


executions_app = typer.Typer(no_args_is_help=True, help="List executions.")
workflows_app = typer.Typer(no_args_is_help=True, help="Publish and inspect workflow versions.")
app.add_typer(executions_app, name="executions")
app.add_typer(workflows_app, name="workflows")

HomeOpt = typer.Option(None, "--home", envvar="WEFT_HOME", help="Stack folder (default ./.weft).")
JsonOpt = typer.Option(False, "--json", help="Print JSON only.")
StepsOpt = typer.Option(
    None, "--steps", metavar="MODULES",
    help="Modules `python` steps may call, comma-separated (shop.steps,billing); a module allows its submodules. "
         "Default: WEFT_STEP_MODULES; unset, `weft up` allows the modules in its working directory and "
         "`weft worker` none (entry points of group weft.steps are always allowed).",
)


def _settings(home: Optional[Path], **flags: Any):
    from services.settings import Settings

    if home is not None:
        flags["home"] = home
    try:
        return Settings.load(**flags)
    except ValueError as exc:
        out.fail(2, f"bad settings: {exc}")


def _store(home: Optional[Path], settings: Any = None):
    from services.store import open_store

    settings = settings or _settings(home)
    need_stack(settings)
    return open_store(settings.database_url)


def need_stack(settings: Any) -> None:
    """Say at once, in one line, that no stack is running, instead of creating an empty
    store and showing empty tables (or waiting forever for an execution nobody runs).

    A deployed stack is named by WEFT_DATABASE_URL: then the store itself says whether
    it can be reached."""
    from services.settings import read_stack

    if os.environ.get("WEFT_DATABASE_URL"):
        return
    home = settings.home.resolve()
    stack = read_stack(home)
    pid = stack.get("pid")
    if pid and out.alive(pid):
        return
    why = f"`weft up` (pid {pid}) is no longer running in {home}" if pid else f"no Weft stack is running in {home}"
    out.fail(1, f"{why}: start one with `weft up` (or `weft up --home DIR`), or point --home / WEFT_HOME at a "
                "running one (WEFT_DATABASE_URL and WEFT_NATS_URL for a deployed stack)")


def _json_arg(name: str, raw: str, most: int | None = None) -> Any:
    """JSON from the argument or from @file. With `most` (the payload maximum), a file far over
    it (its compact JSON cannot be under it, whitespace allowed for) is refused unread."""
    text: str | bytes = raw
    if raw.startswith("@"):
        try:
            path = Path(raw[1:])
            if most is not None and (size := path.stat().st_size) > 2 * most:
                out.fail(2, f"{name}: {raw[1:]} is {size} bytes, over the limit of {most} bytes (WEFT_PAYLOAD_MAX)")
            text = path.read_bytes()
        except OSError as exc:
            out.fail(2, f"{name}: cannot read {raw[1:]}: {exc.strerror}")
    from contracts import values

    try:  # not orjson: it reads a 65-bit integer as a float, silently
        return values.loads(text, name.lstrip("-").replace("-", "_"))
    except values.ValueProblem as exc:
        out.fail(2, f"{name}: {exc}")


def _definition(file: Path, home: Optional[Path] = None):
    from contracts.definitions import DefinitionError, parse_definition

    try:
        text = file.read_text()
    except OSError as exc:
        out.fail(2, f"{file}: {exc.strerror}")
    try:
        wf = parse_definition(text)
    except DefinitionError as exc:
        out.fail(2, f"{file}: {exc}")
    _warn_refused_callables(wf, home)
    return wf


def _warn_refused_callables(wf: Any, home: Optional[Path]) -> None:
    """`weft up` wrote its worker's allowlist into stack.json: say so if this definition goes past it."""
    from services.settings import read_stack

    names = read_stack(home or Path(os.environ.get("WEFT_HOME") or ".weft")).get("step_modules")
    if names is None:
        return
    from rich.markup import escape

    from services.worker.steps.allowlist import StepModules, refused_callables

    for warning in refused_callables(wf, StepModules(tuple(names))):
        out.errors.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)


# ---- running the stack ----------------------------------------------------------------------


@app.command()
def up(
    home: Optional[Path] = HomeOpt,
    nats_port: int = typer.Option(0, help="NATS port (0: a free one)."),
    concurrency: Optional[int] = typer.Option(None, help="Worker concurrency (default 16, or WEFT_WORKER_CONCURRENCY)."),
    no_worker: Optional[bool] = typer.Option(None, "--no-worker", help="Run no worker (in this process or beside it)."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=0, max=64,
        help="Worker processes beside this one (0: the worker runs in this process). "
             "Default: WEFT_WORKER_PROCESSES, or one per core beyond the first."),
    steps: Optional[str] = StepsOpt,
    log_level: str = typer.Option("WARNING", envvar="WEFT_LOG_LEVEL"),
) -> None:
    """Run the whole stack on embedded defaults: NATS + SQLite + all services."""
    from weft.up import run_up

    _logging(log_level)
    settings = _settings(home, nats_port=nats_port or None, worker_concurrency=concurrency, no_worker=no_worker,
                         step_modules=steps, worker_processes=workers)
    raise typer.Exit(run_up(settings, log_level=log_level))


def _logging(level: str) -> None:
    from services.telemetry.logs import configure  # WEFT_LOG_FORMAT=json: one JSON object per line

    try:
        configure(level)
    except ValueError as exc:
        out.fail(2, str(exc))


def _service(parts: tuple[str, ...], home: Optional[Path], log_level: str, *, settings: Any = None,
             on_ready: Any = None, **flags: Any) -> None:
    """Run some services in this process until SIGINT/SIGTERM (`weft orchestrator`, `weft worker`, ...)."""
    from services.stack import install_signal_handlers, run_services

    _logging(log_level)
    if settings is None:
        from services.broker.nats_auth import role_for

        # A service started alone takes its own role's broker credentials from the stack, not admin's.
        flags.setdefault("nats_role", role_for(parts))
        settings = _settings(home, **flags)

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop, settings.drain_grace)
        await run_services(settings, parts, stop, on_ready=on_ready)

    from services.broker import BrokerError

    try:
        asyncio.run(main())
    except (RuntimeError, BrokerError) as exc:  # e.g. no broker, or it refused our credentials: no traceback
        out.fail(1, str(exc))


@app.command()
def orchestrator(home: Optional[Path] = HomeOpt, log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL")) -> None:
    """Run the result consumer (any number of replicas)."""
    _service(("orchestrator",), home, log_level)


@app.command()
def relay(home: Optional[Path] = HomeOpt, log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL")) -> None:
    """Run the outbox relay."""
    _service(("relay",), home, log_level)


@app.command()
def projector(home: Optional[Path] = HomeOpt, log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL")) -> None:
    """Run the projections (status views)."""
    _service(("projector",), home, log_level)


@app.command()
def worker(
    home: Optional[Path] = HomeOpt,
    concurrency: int = typer.Option(None, "--concurrency", "-c", help="Steps run at once."),
    steps: Optional[str] = StepsOpt,
    log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL"),
) -> None:
    """Run a stateless worker."""
    from weft.workers import die_with_parent

    die_with_parent()  # started by `weft up --workers N`: goes when it goes
    _service(("worker",), home, log_level, worker_concurrency=concurrency, step_modules=steps)


# ---- executions -----------------------------------------------------------------------------


@app.command()
def run(
    file: str = typer.Argument(..., metavar="FILE|MODULE:WORKFLOW",
                               help="Workflow definition (YAML or JSON), or a code-first weft.Workflow."),
    input: str = typer.Option("{}", "--input", "-i", help="Execution input as JSON, or @file.json."),
    idempotency_key: Optional[str] = typer.Option(None, "--idempotency-key"),
    timeout: float = typer.Option(0, help="Stop following after this many seconds (0: never)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Start, print {execution_id, status, workflow, version} "
                                                          "and do not follow."),
    as_json: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
) -> None:
    """Register the definition, start an execution, follow it, print the result."""
    from services.orchestrator.executions import Executions, InputError
    from services.orchestrator.registry import Registry

    from contracts.definitions import validate_input

    from contracts.payloads import PayloadError, measure

    wf = _code_first(file, home) if _is_code_first(file) else _definition(Path(file), home)
    settings = _settings(home)
    data = _json_arg("--input", input, most=settings.payload_max)
    try:  # over the payload maximum: refused before anything is stored
        measure(data, settings.payload_limits(), "--input")
    except PayloadError as exc:
        out.fail(2, str(exc))
    problems = validate_input(wf, data)
    if problems:  # before anything is stored, the workflow version included
        out.fail(2, str(InputError(problems)))
    with _store(home, settings) as store:
        version = Registry(store).publish(wf)
        executions = Executions(store, limits=settings.payload_limits())
        state, created = executions.start(version, data, idempotency_key=idempotency_key)
        if not created and not executions.claims.same(state.input, data):  # as HTTP answers 409: never silent
            out.fail(2, f"--idempotency-key {idempotency_key!r} already started execution {state.id} with a "
                        "different input; use a new key for a new execution")
        if no_wait:
            out.emit({"execution_id": state.id, "status": state.status, "workflow": wf.name,
                      "version": version.version}, as_json)
            return
        if not as_json:
            out.note_stack(settings)
        state = out.follow(executions, state.id, timeout=timeout, quiet=as_json)
        result = out.execution_summary(state)
        out.emit(result, as_json, render=out.render_result)
        raise typer.Exit(0 if state.status == "completed" else 1)


@app.command()
def status(execution_id: str, as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """State of one execution, per step."""
    state = _load(execution_id, home)
    summary = out.execution_summary(state, steps=True) | _cli_history.replays(execution_id, home)
    out.emit(summary, as_json, render=out.render_status)


@app.command()
def history(
    execution_id: str,
    at: Optional[str] = typer.Option(None, "--at", help="Show the state as of event N, or as of a time (ISO 8601)."),
    as_json: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
) -> None:
    """The execution's events in order; with --at, its state as of event N (or a time)."""
    from services.orchestrator.executions import Executions

    _check_id(execution_id)
    with _store(home) as store:
        events = Executions(store).history(execution_id)
    if not events:
        out.fail(1, f"no execution {execution_id}")
    if at is not None:
        _cli_history.show_history_at(execution_id, events, at, as_json)
        return
    rows = [{"seq": i + 1, **e.model_dump(mode="json")} for i, e in enumerate(events)]
    if as_json:
        sys.stdout.write("".join(orjson.dumps(r).decode() + "\n" for r in rows))
    else:
        out.render_history(rows)


def _check_id(execution_id: str) -> None:
    import uuid

    try:
        uuid.UUID(execution_id)
    except ValueError:
        out.fail(2, f"not an execution id: {execution_id!r}")


def _load(execution_id: str, home: Optional[Path]):
    from services.orchestrator.executions import Executions

    _check_id(execution_id)
    with _store(home) as store:
        state = Executions(store).load(execution_id)
    if not state.version:
        out.fail(1, f"no execution {execution_id}")
    return state


def _control(execution_id: str, cmd: Any, as_json: bool, home: Optional[Path]) -> None:
    from services.orchestrator.decide import DecisionError
    from services.orchestrator.executions import Executions, NotFound

    _check_id(execution_id)
    with _store(home) as store:
        executions = Executions(store)
        try:
            events = executions.command(execution_id, cmd)
        except (NotFound, DecisionError) as exc:
            out.fail(1, str(exc))
        state = executions.load(execution_id)
    summary = out.execution_summary(state) | {"events": [e.type for e in events]}

    def said(value: dict[str, Any]) -> None:  # one line for a person; --json has the whole summary
        what = ", ".join(value["events"]) or "nothing to do (already so)"
        out.console.print(f"execution {value['execution_id']} · {value['status']} · recorded: {what}", highlight=False)

    out.emit(summary, as_json, render=said)


@app.command()
def cancel(execution_id: str, why: Optional[str] = typer.Option(None, "--why"), as_json: bool = JsonOpt,
           home: Optional[Path] = HomeOpt) -> None:
    """Cancel an execution (recorded as an event)."""
    from services.orchestrator.decide import Cancel

    _control(execution_id, Cancel(by=_user(), why=why), as_json, home)


@app.command()
def pause(execution_id: str, as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Stop scheduling new steps; running steps finish."""
    from services.orchestrator.decide import Pause

    _control(execution_id, Pause(by=_user()), as_json, home)


@app.command()
def resume(execution_id: str, as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Resume a paused execution."""
    from services.orchestrator.decide import Resume

    _control(execution_id, Resume(by=_user()), as_json, home)


@app.command()
def retry(execution_id: str, as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Run a failed execution's failed steps again, keeping successful outputs."""
    from services.orchestrator.decide import Retry

    _control(execution_id, Retry(by=_user()), as_json, home)


def _user() -> str:
    return os.environ.get("WEFT_USER") or os.environ.get("USER") or "cli"


@executions_app.command("list")
def executions_list(
    workflow: Optional[str] = typer.Option(None, "--workflow"),
    status_: Optional[str] = typer.Option(None, "--status"),
    limit: int = typer.Option(50, "--limit"),
    as_json: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
) -> None:
    """Executions, newest first (from the executions view)."""
    from services.projections import ExecutionsView, catch_up
    from services.projections.executions import list_executions

    statuses = {"running", "paused", "completed", "failed", "cancelled"}
    if status_ is not None and status_ not in statuses:
        out.fail(2, f"--status: must be one of {', '.join(sorted(statuses))}")
    with _store(home) as store:
        # Bring the view up to date first, so a list right after a run shows it; bounded, so a
        # stopped projector with a large backlog cannot make one list take minutes.
        catch_up(store, [ExecutionsView()], limit=200_000)
        with store.reader() as tx:
            rows = list_executions(tx, workflow=workflow, status=status_, limit=limit)
    out.emit(rows, as_json, render=out.render_executions)


# ---- workflows ------------------------------------------------------------------------------


def _code_first(target: str, home: Optional[Path] = None):
    """`package.module:workflow` (a weft.Workflow) -> its checked WorkflowDef."""
    from contracts.definitions import DefinitionError
    from weft.workflow import load

    try:
        wf = load(target).definition()
    except DefinitionError as exc:
        out.fail(2, f"{target}: {exc}")
    except (ImportError, ValueError, TypeError) as exc:
        out.fail(2, f"{target}: {type(exc).__name__}: {exc}")
    _warn_refused_callables(wf, home)
    return wf


def _is_code_first(target: str) -> bool:
    return ":" in target and not Path(target).exists()


@workflows_app.command("publish")
def workflows_publish(
    file: str = typer.Argument(..., metavar="FILE|MODULE:WORKFLOW",
                               help="A YAML/JSON definition, or a code-first weft.Workflow (examples.orders:orders)."),
    as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt,
) -> None:
    """Register a version: immutable, content-hashed; identical content is a no-op."""
    from services.orchestrator.registry import Registry

    wf = _code_first(file, home) if _is_code_first(file) else _definition(Path(file), home)
    with _store(home) as store:
        v = Registry(store).publish(wf)
    out.emit({"id": f"{v.name}@{v.version}", "workflow": v.name, "version": v.version,
              "content_hash": v.content_hash, "created": v.created}, as_json)


@workflows_app.command("list")
def workflows_list(as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Every workflow with its latest version."""
    from services.orchestrator.registry import Registry

    with _store(home) as store:
        reg = Registry(store)
        rows = []
        for name in reg.names():
            v = reg.get(name)
            rows.append({"id": name, "workflow": name, "version": v.version, "content_hash": v.content_hash,
                         "published_at": v.published_at.isoformat()})
    out.emit(rows, as_json, render=out.render_table)


@workflows_app.command("show")
def workflows_show(name: str = typer.Argument(..., metavar="NAME|MODULE:WORKFLOW"), version: Optional[int] = typer.Option(None, "--version"), as_json: bool = JsonOpt,
                   home: Optional[Path] = HomeOpt) -> None:
    """One version's definition; for MODULE:WORKFLOW, the YAML a code-first workflow compiles to (no stack)."""
    from services.orchestrator.registry import Registry, UnknownWorkflow

    if _is_code_first(name):
        wf = _code_first(name, home)
        if as_json:
            out.emit({"workflow": wf.name, "content_hash": wf.content_hash(), "definition": wf.canonical()}, True)
        else:
            import yaml

            sys.stdout.write(f"# {wf.name}  {wf.content_hash()}\n")
            sys.stdout.write(yaml.safe_dump(wf.canonical(), sort_keys=False, allow_unicode=True))
        return

    with _store(home) as store:
        try:
            v = Registry(store).get(name, version)
        except UnknownWorkflow as exc:
            out.fail(1, str(exc))
    out.emit({"id": f"{v.name}@{v.version}", "workflow": v.name, "version": v.version,
              "content_hash": v.content_hash, "definition": v.definition.canonical()}, as_json)


from weft import cli_dlq as _cli_dlq  # noqa: E402,F401
from weft import cli_history as _cli_history  # noqa: E402
from weft import cli_gateway as _cli_gateway  # noqa: E402,F401


def main() -> None:
    app()
from weft import cli_broker as _cli_broker  # noqa: E402,F401
