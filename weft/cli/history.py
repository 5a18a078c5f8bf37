"""CLI: projections (status, rebuild), replay (one or bulk), backfill, and `history --at`.

Registered by one import at the end of weft/cli/__init__.py. Reporting commands take
--json (then JSON only); long-running ones show a Rich progress bar on stderr
unless --json. Exit codes: 0 ok, 1 the operation failed (or was cancelled),
2 bad input, 3 not found.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table

from weft.cli import output as out
from weft.cli.common import (
    HomeOpt,
    JsonOpt,
    app,
    check_id,
    executions_app,
    json_arg,
    BAD_INPUT,
    NOT_FOUND,
    not_found,
    published,
    store_for,
    workflow_ref,
    workflows_app,
)

projections_app = typer.Typer(no_args_is_help=True, help="Status views: position, lag, rebuild.")
app.add_typer(projections_app, name="projections")


# ---- shared -----------------------------------------------------------------------------------


def _progress(as_json: bool) -> Progress | None:
    if as_json or not (sys.stderr.isatty() or os.environ.get("WEFT_PROGRESS")):
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=out.errors, transient=False)


def _items_progress(as_json: bool, label: str) -> tuple[AbstractContextManager[Any], Callable[..., None]]:
    """(the bar to run the operation in, its `progress(done, total, item)` callback) for a bulk operation."""
    bar = _progress(as_json)
    if bar is None:
        return nullcontext(), lambda done, total, item: None
    task = bar.add_task(label, total=None)

    def progress(done: int, total: int, item: dict[str, Any]) -> None:
        bar.update(task, completed=done, total=total, description=f"{label} {item['outcome']:<11}")

    return bar, progress


@contextmanager
def _interruptible() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C asks the loop to stop between items (and report); a second one aborts."""
    asked = {"stop": False}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if asked["stop"]:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        asked["stop"] = True
        out.errors.print("[yellow]stopping after the current item (Ctrl-C again to abort)[/yellow]")

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: asked["stop"]
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- projections ------------------------------------------------------------------------------


@projections_app.command("status")
def projections_status(as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Each view: tracked position, head of the log, lag, event rate, rebuild state."""
    from services.projections import default_views, projection_status

    with store_for(home) as store:
        rows = projection_status(store, default_views())
    out.emit(rows, as_json, render=_render_projections)


def _render_projections(rows: list[dict[str, Any]]) -> None:
    table = Table("view", "position", "head", "lag", "events/s", "version", "rebuilt", "state")
    for r in rows:
        state = "ok" if r["lag"] == 0 else "catching up"
        if r["rebuilding"]:
            rb = r["rebuilding"]
            state = f"rebuilding {rb['position']}/{rb['head']}"
        elif r["needs_rebuild"]:
            state = f"needs rebuild (v{r['version']} -> v{r['code_version']})"
        table.add_row(r["name"], str(r["position"]), str(r["head"]), str(r["lag"]), f"{r['events_per_s']:,.0f}",
                      str(r["version"]), (r["rebuilt_at"] or "never")[:19], state)
    out.console.print(table)


@projections_app.command("rebuild")
def projections_rebuild(
    name: str = typer.Argument(..., help="View: executions, step_runs, timeline, workflow_stats, or all."),
    batch: int = typer.Option(5000, "--batch", min=1, help="Events per batch."),
    as_json: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
) -> None:
    """Build a view again from position 0 into shadow tables, then swap it in atomically.

    Reads and the live projector carry on meanwhile. Use it when a view's code changed.
    """
    from services.projections import RebuildBusy, default_views, rebuild, view_named

    try:
        views = default_views() if name == "all" else [view_named(name)]
    except KeyError as exc:
        out.fail(2, str(exc.args[0]))
    store = store_for(home)
    results = []
    try:
        bar = _progress(as_json)
        with bar or nullcontext():
            for view in views:
                task = bar.add_task(f"rebuild {view.name.removeprefix('view:')}", total=None) if bar else None

                def progress(done: int, total: int, task: Any = task) -> None:
                    if bar is not None:
                        bar.update(task, completed=done, total=total)

                try:
                    results.append(rebuild(store, view, batch=batch, progress=progress).as_dict())
                except RebuildBusy as exc:
                    out.fail(1, str(exc))
    finally:
        store.close()
    value: Any = results if name == "all" else results[0]
    out.emit(value, as_json, render=_render_rebuilds)


def _render_rebuilds(value: Any) -> None:
    for r in value if isinstance(value, list) else [value]:
        out.console.print(
            f"rebuilt [bold]{r['name']}[/bold]: {r['events']:,} events in {r['seconds']:.2f}s "
            f"({(r['events_per_s'] or 0):,.0f} events/s) · position {r['position']} · generation {r['generation']} "
            f"· tables {', '.join(r['tables'])}"
        )


# ---- reads from the views: attempts, timeline, workflow stats -----------------------------------


def _read_view(home: Optional[Path], view: Any, read: Callable[[Any], Any]) -> Any:
    """Bring one view up to date (bounded), then read it."""
    from services.projections import catch_up

    with store_for(home) as store:
        catch_up(store, [view], limit=200_000)
        with store.reader() as tx:
            return read(tx)


@executions_app.command("attempts")
def executions_attempts(execution_id: str, as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Every attempt of an execution's steps: status, duration, worker, error (from the step-runs view)."""
    from services.projections import StepRunsView, step_runs

    check_id(execution_id)
    rows = _read_view(home, StepRunsView(), lambda tx: step_runs(tx, execution_id))
    if not rows:
        not_found(f"no attempts recorded for {execution_id}")
    out.emit(rows, as_json, render=_render_attempts)


def _render_attempts(rows: list[dict[str, Any]]) -> None:
    cols = [out.Col("step", key=True), out.Col("attempt", justify="right"), out.Col("status", key=True),
            out.Col("duration ms", justify="right", drop=2), out.Col("worker", key=True, drop=1),
            out.Col("error / note")]
    cells = []
    for r in rows:
        step = r["step_id"] + (f"#{r['item']}" if r["item"] is not None else "")
        note = f"{r['error_type']}: {r['error_message']}" if r["error_type"] else ""
        note = note or (f"reused from {r['reused_from']}" if r["reused_from"] else "") or (r["ignored_reason"] or "")
        duration = f"{r['duration_ms']:.1f}" if r["duration_ms"] is not None else ""
        cells.append([escape(step), str(r["attempt"]), out.status_markup(r["status"]), duration,
                      escape(r["worker_id"] or ""), escape(note[:70])])
    out.fitted(cols, cells)


@executions_app.command("timeline")
def executions_timeline(execution_id: str, as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """An execution's events as a timeline, one line each (from the timeline view)."""
    from services.projections import TimelineView, timeline

    check_id(execution_id)
    rows = _read_view(home, TimelineView(), lambda tx: timeline(tx, execution_id))
    if not rows:
        not_found(f"no execution {execution_id}")
    out.emit(rows, as_json, render=_render_timeline)


def _render_timeline(rows: list[dict[str, Any]]) -> None:
    cols = [out.Col("seq", key=True, justify="right"), out.Col("at", drop=2), out.Col("event", key=True),
            out.Col("step", key=True), out.Col("attempt", drop=1), out.Col("detail")]
    out.fitted(cols, [[str(r["seq"]), r["at"][11:23], r["type"],
                       escape((r["step_id"] or "") + (f"#{r['item']}" if r["item"] is not None else "")),
                       str(r["attempt"] or ""), escape((r["detail"] or "")[:70])] for r in rows])


@workflows_app.command("stats")
def workflows_stats(name: Optional[str] = typer.Argument(None, metavar="[NAME[@VERSION]]"), as_json: bool = JsonOpt,
                    home: Optional[Path] = HomeOpt) -> None:
    """Per workflow: executions by status, p50/p95 duration of completed ones, failure rate.

    Statistics are kept per workflow over all its versions: NAME@VERSION is checked to exist and
    shows its workflow's line."""
    from services.projections import WorkflowStatsView, workflow_stats

    wanted = None
    if name is not None:
        wanted, version = workflow_ref(name, "NAME")
        with store_for(home) as store:
            published(store, wanted, version)  # exit 3 for a workflow or version nobody published
        if version is not None and not as_json:
            out.errors.print(f"statistics are per workflow: {wanted}, all versions", highlight=False)
    rows = _read_view(home, WorkflowStatsView(), lambda tx: workflow_stats(tx, wanted))
    out.emit(rows, as_json, render=_render_stats)


def _render_stats(rows: list[dict[str, Any]]) -> None:
    """Readable at 80 columns: the workflow whole, then what matters most (totals, failures, durations);
    running, cancelled and paused go first when the terminal is narrow."""
    if not rows:
        out.console.print("(no executions yet)")
        return
    cols = [out.Col("workflow", key=True), out.Col("total", justify="right"), out.Col("done", justify="right"),
            out.Col("failed", justify="right"), out.Col("fail %", justify="right"),
            out.Col("p50 ms", justify="right", drop=1), out.Col("p95 ms", justify="right", drop=1),
            out.Col("running", justify="right", drop=2), out.Col("cancelled", justify="right", drop=3),
            out.Col("paused", justify="right", drop=4)]
    cells = []
    for r in rows:
        rate = f"{r['failure_rate']:.1%}" if r["failure_rate"] is not None else "-"
        ms = [f"{r[k]:,.0f}" if r[k] is not None else "-" for k in ("p50_ms", "p95_ms")]
        cells.append([r["workflow"], str(r["total"]), str(r["completed"]), str(r["failed"]), rate, *ms,
                      str(r["running"]), str(r["cancelled"]), str(r["paused"])])
    out.fitted(cols, cells)


# ---- replay -----------------------------------------------------------------------------------


@app.command()
def replay(
    execution_id: Optional[str] = typer.Argument(None, help="The execution to replay (or use --filter)."),
    from_step: Optional[str] = typer.Option(None, "--from-step", help="Re-run this step and what follows; "
                                            "keep the recorded outputs of the others."),
    input_patch: Optional[str] = typer.Option(None, "--input-patch", help="RFC 7386 merge patch of the input "
                                              "(JSON, or @file.json)."),
    version: str = typer.Option("same", "--version", help="same | latest | N"),
    filter_: Optional[str] = typer.Option(None, "--filter", help="Bulk: workflow=W,status=failed,since=24h,"
                                          "until=T,version=N,limit=N"),
    operation_id: Optional[str] = typer.Option(None, "--operation-id", help="Bulk: name the operation "
                                               "(default: derived from the filter and options)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be reused and re-run; change nothing."),
    wait: bool = typer.Option(False, "--wait", help="Follow the replay until it finishes (one execution)."),
    as_json: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
) -> None:
    """Replay a past execution as a new one (same version and input unless told otherwise), or many with --filter."""
    from contracts.payloads import PayloadTooLarge
    from services.replay import ReplayError, bulk_replay, replay_execution

    if (execution_id is None) == (filter_ is None):
        out.fail(2, "give an execution id or --filter (not both)")
    patch = json_arg("--input-patch", input_patch) if input_patch is not None else None
    named: tuple[str, int] | None = None
    if filter_ is not None:
        filter_, named = _filter_with_version(filter_)
    with store_for(home) as store:
        if named is not None:
            published(store, *named)  # exit 3 for a version nobody published, not "0 selected"
        if filter_ is not None:
            if wait:
                out.fail(2, "--wait applies to one execution, not to --filter")
            bar, progress = _items_progress(as_json, "replay")
            try:
                with _interruptible() as stop, bar:
                    report = bulk_replay(store, filter_, from_step=from_step, input_patch=patch, version=version,
                                         dry_run=dry_run, operation_id=operation_id, progress=progress,
                                         should_stop=stop)
            except ReplayError as exc:
                _replay_failed(exc)
            out.emit(report, as_json, render=_render_bulk)
            raise typer.Exit(1 if report["failed"] or report["cancelled"] else 0)
        assert execution_id is not None  # checked above: an id or a filter, and there is no filter
        try:
            result = replay_execution(store, execution_id, from_step=from_step, input_patch=patch,
                                      version=version, dry_run=dry_run)
        except ReplayError as exc:
            _replay_failed(exc)
        except PayloadTooLarge as exc:  # nothing was stored
            out.fail(2, str(exc))
        if wait and not dry_run:
            from services.orchestrator.executions import Executions

            state = out.follow(Executions(store), result["execution_id"], quiet=as_json)
            result |= out.execution_summary(state) | {"replay_of": result["replay_of"]}
            out.emit(result, as_json, render=_render_replay)
            raise typer.Exit(0 if state.status == "completed" else 1)
    out.emit(result, as_json, render=_render_replay)


def _replay_failed(exc: Any) -> NoReturn:
    """Exit 3 for an execution that is not there, 2 for the rest (the exit-code rule of weft/cli/common.py)."""
    out.fail(NOT_FOUND if exc.code == "not_found" else BAD_INPUT, str(exc))


def _filter_with_version(text: str) -> tuple[str, tuple[str, int] | None]:
    """`workflow=W@V` in a --filter is `workflow=W,version=V`: NAME@VERSION works here as everywhere.
    Returns the filter and the (name, version) it named that way."""
    parts, named = [], None
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if key.strip() == "workflow" and "@" in value:
            name, version = workflow_ref(value.strip(), "--filter workflow")
            assert version is not None  # "@" was in it
            named = (name, version)
            parts.append(f"workflow={name}")
            parts.append(f"version={version}")
        else:
            parts.append(part)
    return ",".join(parts), named


def _render_replay(r: dict[str, Any]) -> None:
    versions = f"{r['workflow']}@{r['source_version']}"
    if r["version"] != r["source_version"]:
        versions += f" -> @{r['version']}"
    if r["dry_run"]:
        out.console.print(f"[bold]dry run[/bold] · replay of {r['replay_of']} · {versions} · nothing was started")
    else:
        out.console.print(f"replay [bold]{r['execution_id']}[/bold] · {out.status_markup(r['status'])}"
                          + ("" if r.get("created", True) else " (already started)"))
        out.console.print(f"  of {r['replay_of']} · {versions}")
    table = Table("step", "action", "in the source")
    for s in r["steps"]:
        action = "[green]reuse output[/green]" if s["action"] == "reuse" else "[cyan]run again[/cyan]"
        table.add_row(s["step_id"], action, out.status_markup(s["source_status"] or "-"))
    out.console.print(table)
    if r.get("input_patch") is not None:
        out.console.print_json(orjson.dumps({"input": r["input"]}).decode())
    if r.get("dropped_steps"):
        out.console.print(f"[yellow]not in the target version:[/yellow] {', '.join(r['dropped_steps'])}")
    if r.get("output") is not None or r.get("finished_at"):
        out.render_result(r)


def _render_bulk(r: dict[str, Any]) -> None:
    mode = "dry run · " if r["dry_run"] else ""
    out.console.print(f"{mode}operation [bold]{r['operation_id']}[/bold] · filter {r['filter']} · "
                      f"{r['total']} selected")
    if r["items"]:
        errors = any(it.get("error") for it in r["items"])
        cols = [out.Col("source", key=True), out.Col("outcome"), out.Col("replay", key=True),
                *((out.Col("error"),) if errors else ())]
        rows = []
        for it in r["items"]:
            colour = {"started": "green", "would_start": "cyan", "skipped": "dim", "failed": "red"}[it["outcome"]]
            rows.append([it["source"], f"[{colour}]{it['outcome']}[/]", it["execution_id"] or "",
                         *((escape(it.get("error") or ""),) if errors else ())])
        out.fitted(cols, rows)
    first = f"would start {r['would_start']}" if r["dry_run"] else f"started {r['started']}"
    line = f"{first}, skipped (already replayed by this operation) {r['skipped']}, failed {r['failed']}"
    if r["cancelled"]:
        line += " · [yellow]cancelled[/yellow]: run the same command to carry on"
    out.console.print(line)


# ---- backfill ---------------------------------------------------------------------------------


def _rate(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    raw = text.strip().removesuffix("/s")
    try:
        value = float(raw)
    except ValueError:
        out.fail(2, f"--rate: expected N or N/s (starts per second), got {text!r}")
    if value <= 0:
        out.fail(2, "--rate: must be more than 0")
    return value


@app.command()
def backfill(
    workflow: str = typer.Option(..., "--workflow", help="NAME or NAME@VERSION (default: the latest version)."),
    from_: str = typer.Option(..., "--from", help="Start of the time range (ISO 8601, or 24h, 7d back from now)."),
    to: str = typer.Option(..., "--to", help="End of the time range, exclusive (ISO 8601, or now, or 1h)."),
    event_type: Optional[str] = typer.Option(None, "--event-type", help="Only this event type (default: the "
                                             "workflow's `on: event` types)."),
    rate: Optional[str] = typer.Option(None, "--rate", help="At most N starts per second (N or N/s)."),
    backfill_id: Optional[str] = typer.Option(None, "--id", help="Name this backfill (default: derived from "
                                              "workflow, version, range and event type)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would start; change nothing."),
    as_json: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
) -> None:
    """Run the trigger events recorded in a time range through a workflow version.

    Each event starts at most one execution per backfill id: run the same command
    again after an interruption and it carries on where it stopped.
    """
    from datetime import datetime, timezone

    from services.replay import BackfillError, ReplayError, backfill as run_backfill, parse_time, parse_workflow

    try:
        name, version = parse_workflow(workflow)
        now = datetime.now(timezone.utc)
        start = parse_time("--from", from_, now)
        end = now if to.strip().lower() == "now" else parse_time("--to", to, now)
    except (BackfillError, ReplayError) as exc:
        out.fail(2, str(exc))
    pace = _rate(rate)
    with store_for(home) as store:
        published(store, name, version)  # exit 3 for a workflow or version nobody published
        bar, progress = _items_progress(as_json, "backfill")
        try:
            with _interruptible() as stop, bar:
                report = run_backfill(store, name, version=version, start=start, end=end, event_type=event_type,
                                      rate=pace, dry_run=dry_run, backfill_id=backfill_id, progress=progress,
                                      should_stop=stop)
        except BackfillError as exc:
            out.fail(2, str(exc))
    out.emit(report, as_json, render=_render_backfill)
    raise typer.Exit(1 if report["failed"] or report["cancelled"] else 0)


def _render_backfill(r: dict[str, Any]) -> None:
    mode = "dry run · " if r["dry_run"] else ""
    out.console.print(f"{mode}backfill [bold]{r['backfill_id']}[/bold] · {r['workflow']}@{r['version']} · "
                      f"{r['from']} .. {r['to']} · events {', '.join(r['event_types'])} · {r['total']} found")
    if r["dry_run"] and r["items"]:
        out.fitted([out.Col("event", key=True), out.Col("source", drop=2), out.Col("time", drop=1),
                    out.Col("outcome"), out.Col("execution", key=True)],
                   [[escape(it["id"]), escape(it["source"]), it["time"][:19], it["outcome"], it["execution_id"] or ""]
                    for it in r["items"]])
    for it in r["items"]:
        if it["outcome"] == "failed":
            out.console.print(f"[red]failed[/red] {it['source']} {it['id']}: {it['error']}", highlight=False)
    line = (f"would start {r['would_start']}, " if r["dry_run"] else f"started {r['started']}, ") + \
        f"skipped (already done) {r['skipped']}, failed {r['failed']}"
    if r["cancelled"]:
        line += f" · [yellow]cancelled[/yellow] with {r['remaining']} left: run the same command to carry on"
    out.console.print(line)
