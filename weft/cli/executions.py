"""`weft run`, `status`, `history` (with --at), `cancel`, `pause`, `resume`, `retry` and `executions list`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import orjson
import typer

from weft.cli import output as out
from weft.cli.common import (
    HomeOpt,
    JsonOpt,
    acting_user,
    app,
    check_id,
    code_first,
    executions_app,
    is_code_first,
    json_arg,
    not_found,
    published,
    read_definition,
    settings_for,
    store_for,
    workflow_ref,
)


@app.command()
def run(
    file: str = typer.Argument(..., metavar="FILE|MODULE:WORKFLOW|NAME[@VERSION]",
                               help="Workflow definition (YAML or JSON), a code-first weft.Workflow, or a "
                                    "published workflow (NAME: its latest version)."),
    input: str = typer.Option("{}", "--input", "-i", help="Execution input as JSON, or @file.json."),
    idempotency_key: Optional[str] = typer.Option(None, "--idempotency-key"),
    timeout: float = typer.Option(0, help="Stop following after this many seconds (0: never)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Start, print the execution id and do not follow "
                                                          "(with --json: {execution_id, status, workflow, version})."),
    as_json: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
) -> None:
    """Register the definition (or take a published NAME[@VERSION]), start an execution, follow it, print the result."""
    from services.orchestrator.executions import Executions, InputError
    from services.orchestrator.registry import Registry

    from contracts.definitions import validate_input

    from contracts.payloads import PayloadError, measure

    by_name = _published_name(file)
    wf = None if by_name else code_first(file, home) if is_code_first(file) else read_definition(Path(file), home)
    settings = settings_for(home)
    data = json_arg("--input", input, most=settings.payload_max)
    try:  # over the payload maximum: refused before anything is stored
        measure(data, settings.payload_limits(), "--input")
    except PayloadError as exc:
        out.fail(2, str(exc))
    if wf is not None and (problems := validate_input(wf, data)):  # before anything is stored, the version too
        out.fail(2, str(InputError(problems)))
    with store_for(home, settings) as store:
        if by_name is None:
            assert wf is not None
            version = Registry(store).publish(wf)
        else:
            version = published(store, *by_name)
            wf = version.definition
            if problems := validate_input(wf, data):
                out.fail(2, str(InputError(problems)))
        executions = Executions(store, limits=settings.payload_limits())
        state, created = executions.start(version, data, idempotency_key=idempotency_key)
        if not created and not executions.claims.same(state.input, data):  # as HTTP answers 409: never silent
            out.fail(2, f"--idempotency-key {idempotency_key!r} already started execution {state.id} with a "
                        "different input; use a new key for a new execution")
        if no_wait:  # just the id, for `ID=$(weft run ... --no-wait)`; --json has the object
            if as_json:
                out.emit({"execution_id": state.id, "status": state.status, "workflow": wf.name,
                          "version": version.version}, True)
            else:
                sys.stdout.write(state.id + "\n")
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
    summary = out.execution_summary(state, steps=True) | replays(execution_id, home)
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

    check_id(execution_id)
    with store_for(home) as store:
        events = Executions(store).history(execution_id)
    if not events:
        not_found(f"no execution {execution_id}")
    if at is not None:
        show_history_at(execution_id, events, at, as_json)
        return
    rows = [{"seq": i + 1, **e.model_dump(mode="json")} for i, e in enumerate(events)]
    if as_json:
        sys.stdout.write("".join(orjson.dumps(r).decode() + "\n" for r in rows))
    else:
        out.render_history(rows)


def _published_name(target: str) -> tuple[str, Optional[int]] | None:
    """(name, version) when `weft run` names a published workflow (NAME or NAME@VERSION) rather
    than a file or a MODULE:WORKFLOW; a file of that name wins."""
    import re

    if Path(target).exists() or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(@[0-9]+)?", target):
        return None
    if target.endswith((".yaml", ".yml", ".json")):  # a missing file: read_definition says so
        return None
    return workflow_ref(target, "FILE|NAME")


def _load(execution_id: str, home: Optional[Path]):
    from services.orchestrator.executions import Executions

    check_id(execution_id)
    with store_for(home) as store:
        state = Executions(store).load(execution_id)
    if not state.version:
        not_found(f"no execution {execution_id}")
    return state


def _control(execution_id: str, cmd: Any, as_json: bool, home: Optional[Path]) -> None:
    from services.orchestrator.decide import DecisionError
    from services.orchestrator.executions import Executions, NotFound

    check_id(execution_id)
    with store_for(home) as store:
        executions = Executions(store)
        try:
            events = executions.command(execution_id, cmd)
        except NotFound as exc:
            not_found(str(exc))
        except DecisionError as exc:  # e.g. resuming a completed execution: the operation failed
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

    _control(execution_id, Cancel(by=acting_user(), why=why), as_json, home)


@app.command()
def pause(execution_id: str, as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Stop scheduling new steps; running steps finish."""
    from services.orchestrator.decide import Pause

    _control(execution_id, Pause(by=acting_user()), as_json, home)


@app.command()
def resume(execution_id: str, as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Resume a paused execution."""
    from services.orchestrator.decide import Resume

    _control(execution_id, Resume(by=acting_user()), as_json, home)


@app.command()
def retry(execution_id: str, as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Run a failed execution's failed steps again, keeping successful outputs."""
    from services.orchestrator.decide import Retry

    _control(execution_id, Retry(by=acting_user()), as_json, home)


@executions_app.command("list")
def executions_list(
    workflow: Optional[str] = typer.Option(None, "--workflow", help="NAME or NAME@VERSION."),
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
    name, version = workflow_ref(workflow, "--workflow") if workflow else (None, None)
    with store_for(home) as store:
        if name is not None:
            published(store, name, version)  # exit 3 for a typo, not an empty table
        # Bring the view up to date first, so a list right after a run shows it; bounded, so a
        # stopped projector with a large backlog cannot make one list take minutes.
        catch_up(store, [ExecutionsView()], limit=200_000)
        with store.reader() as tx:
            rows = list_executions(tx, workflow=name, status=status_, version=version, limit=limit)
    out.emit(rows, as_json, render=out.render_executions)


# ---- history --at (called by `weft history`) ----------------------------------------------------


def show_history_at(execution_id: str, history: list[Any], at: str, as_json: bool) -> None:
    """Print the state as of event N or as of a time: steps with status, outputs so far, attempts."""
    from services.replay import AtError, state_at

    try:
        state, n, attempts = state_at(execution_id, history, at)
    except AtError as exc:  # a number past the end or a time before the start: out of range, bad input
        out.fail(2, str(exc))
    summary = out.execution_summary(state, steps=True) | {
        "as_of": n, "as_of_time": history[n - 1].at.isoformat(), "of": len(history), "attempts": attempts,
    }
    out.emit(summary, as_json, render=out.render_status)


# ---- lineage in `weft status` --------------------------------------------------------------------


def replays(execution_id: str, home: Optional[Path]) -> dict[str, Any]:
    """{"replays": [...]}: the replays of an execution, from the executions view (brought up to
    date first) for `weft status`; {} if the view is unavailable."""
    from services.projections import ExecutionsView, catch_up, lineage

    store = store_for(home)
    try:
        catch_up(store, [ExecutionsView()], limit=100_000, auto_rebuild=False)
        with store.reader() as tx:
            return {"replays": lineage(tx, execution_id)["replays"]}
    except Exception:  # noqa: BLE001 - status must not fail because a view is unavailable
        return {}
    finally:
        store.close()
