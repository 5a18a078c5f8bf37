"""What every `weft` command shares: the Typer apps, the common options, and the helpers that
find the stack, read JSON arguments and definitions, and run services.

Dependencies point one way: weft/cli/__init__.py imports the command modules (stack,
executions, workflows, dlq, history, gateway, broker), they import this module and
weft/cli/output.py, and this module imports no command module. tests/unit/test_imports.py
holds the package to that.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from weft.cli import output as out

app = typer.Typer(
    no_args_is_help=True, add_completion=True, help="Weft: event-sourced workflow orchestration.",
    epilog="Exit codes: 0 success, 1 failed (or no stack running), 2 bad input, 3 not found. "
           "A workflow is NAME or NAME@VERSION everywhere. --json prints JSON only. "
           "Commands find the stack `weft up` runs through --home / WEFT_HOME (default ./.weft).",
)


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


def settings_for(home: Optional[Path], **flags: Any):
    from services.settings import Settings

    if home is not None:
        flags["home"] = home
    try:
        return Settings.load(**flags)
    except ValueError as exc:
        out.fail(2, f"bad settings: {exc}")


def store_for(home: Optional[Path], settings: Any = None):
    from services.store import open_store

    settings = settings or settings_for(home)
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


def json_arg(name: str, raw: str, most: int | None = None) -> Any:
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


def read_definition(file: Path, home: Optional[Path] = None):
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


def code_first(target: str, home: Optional[Path] = None):
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


def is_code_first(target: str) -> bool:
    return ":" in target and not Path(target).exists()


def configure_logging(level: str) -> None:
    from services.telemetry.logs import configure  # WEFT_LOG_FORMAT=json: one JSON object per line

    try:
        configure(level)
    except ValueError as exc:
        out.fail(2, str(exc))


def run_service(parts: tuple[str, ...], home: Optional[Path], log_level: str, *, settings: Any = None,
                on_ready: Any = None, **flags: Any) -> None:
    """Run some services in this process until SIGINT/SIGTERM (`weft orchestrator`, `weft worker`, ...)."""
    from services.stack import install_signal_handlers, run_services

    configure_logging(log_level)
    if settings is None:
        from services.broker.nats_auth import role_for

        # A service started alone takes its own role's broker credentials from the stack, not admin's.
        flags.setdefault("nats_role", role_for(parts))
        settings = settings_for(home, **flags)

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop, settings.drain_grace)
        await run_services(settings, parts, stop, on_ready=on_ready)

    from services.broker import BrokerError

    try:
        asyncio.run(main())
    except (RuntimeError, BrokerError) as exc:  # e.g. no broker, or it refused our credentials: no traceback
        out.fail(1, str(exc))


# Exit codes, the same for every command (README "Exit codes"): 0 success, 1 the execution or
# operation failed (or no stack runs), 2 bad input (a malformed flag, value, id or file), 3 not found
# (no execution, workflow, version, dead letter or key by that id or name).
OK, FAILED, BAD_INPUT, NOT_FOUND = 0, 1, 2, 3


def not_found(message: str) -> NoReturn:
    out.fail(NOT_FOUND, message)


def workflow_ref(text: str, flag: str = "workflow", version: Optional[int] = None) -> tuple[str, Optional[int]]:
    """NAME or NAME@VERSION, the one way every command names a workflow (a --version flag beside
    it must agree). Exit 2 for anything else."""
    name, sep, number = text.partition("@")
    if not name or (sep and (not number.isdigit() or int(number) < 1)):
        out.fail(BAD_INPUT, f"{flag}: expected NAME or NAME@VERSION (VERSION a number from 1), got {text!r}")
    if not sep:
        return name, version
    if version is not None and version != int(number):
        out.fail(BAD_INPUT, f"{flag}: {text!r} and --version {version} disagree")
    return name, int(number)


def published(store: Any, name: str, version: Optional[int]) -> Any:
    """The published version (the latest for None), or exit 3 naming what is missing."""
    from services.orchestrator.registry import Registry, UnknownWorkflow

    try:
        return Registry(store).get(name, version)
    except UnknownWorkflow as exc:
        not_found(str(exc))


def check_id(execution_id: str) -> None:
    import uuid

    try:
        uuid.UUID(execution_id)
    except ValueError:
        out.fail(2, f"not an execution id: {execution_id!r}")


def acting_user() -> str:
    return os.environ.get("WEFT_USER") or os.environ.get("USER") or "cli"
