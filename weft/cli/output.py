"""How the CLI shows things: Rich for people, plain JSON with --json."""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, NoReturn

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
errors = Console(stderr=True)


def fail(code: int, message: str) -> NoReturn:
    errors.print(f"[red]error:[/red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def emit(value: Any, as_json: bool, render: Callable[[Any], None] | None = None) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif render is not None:
        render(value)
    else:
        console.print_json(orjson.dumps(value).decode())


def execution_summary(state: Any, steps: bool = False) -> dict[str, Any]:
    from services.orchestrator.state import summary

    return summary(state, steps=steps)


def follow(executions: Any, execution_id: str, *, timeout: float = 0, quiet: bool = False) -> Any:
    """Poll the store until the execution finishes, showing step progress."""
    deadline = time.monotonic() + timeout if timeout else None
    state = executions.load(execution_id)
    total = len(state.steps)
    delay = 0.02
    progress = None if quiet or not sys.stderr.isatty() and not os.environ.get("WEFT_PROGRESS") else Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=errors, transient=True,
    )
    with progress or nullcontext():
        task = progress.add_task(f"{state.workflow} {state.id[:8]}", total=total) if progress else None
        while not state.finished:
            if deadline and time.monotonic() > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
            state = executions.load(execution_id)
            if progress is not None and task is not None:
                done = sum(1 for s in state.steps.values() if s.status in ("succeeded", "skipped"))
                running = [k for k, s in state.steps.items() if s.status == "scheduled"]
                desc = f"{state.workflow} {state.id[:8]} {state.status}" + (f" · {', '.join(running[:3])}" if running else "")
                progress.update(task, completed=done, description=desc)
    return state


def note_stack(settings: Any) -> None:
    from services.settings import read_stack

    stack = read_stack(settings.home)
    if not stack and not os.environ.get("WEFT_DATABASE_URL"):
        errors.print(f"[yellow]note:[/yellow] no `weft up` found in {settings.home}; the execution runs when a stack does")
    elif stack.get("pid") and not alive(stack["pid"]):
        errors.print(f"[yellow]note:[/yellow] `weft up` (pid {stack['pid']}) is not running; the execution runs when it does")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_COLOURS = {"completed": "green", "succeeded": "green", "failed": "red", "dead_lettered": "red", "cancelled": "yellow",
            "paused": "yellow", "skipped": "dim", "running": "cyan", "scheduled": "cyan", "pending": "dim"}


def status_markup(text: str) -> str:
    """A status in its colour (Rich markup), the same in every table."""
    return f"[{_COLOURS.get(text, 'white')}]{text}[/]"


def render_result(r: dict[str, Any]) -> None:
    console.print(f"execution [bold]{r['execution_id']}[/bold] {status_markup(r['status'])}"
                  + (f" in {r['duration_ms']} ms" if r.get("duration_ms") is not None else ""))
    if r.get("error"):
        e = r["error"]
        console.print(f"[red]{e['type']}[/red] in step {e['step_id']}: {e['message']}", highlight=False)
    console.print_json(orjson.dumps({"output": r["output"]}).decode())


def render_status(r: dict[str, Any]) -> None:
    head = f"{r['workflow']}@{r['version']} · execution {r['execution_id']} · {status_markup(r['status'])}"
    if "as_of" in r:
        head += f" · as of event {r['as_of']}"
    console.print(head)
    if r.get("replay_of"):
        console.print(f"replay of {r['replay_of']}")
    if r.get("replays"):
        console.print(f"replays: {', '.join(r['replays'])}")
    table = Table("step", "status", "attempts", "items", "output / error")
    for s in r["steps"]:
        detail = f"{s['error']['type']}: {s['error']['message']}" if s["error"] else orjson.dumps(s["output"]).decode()
        if s.get("skip_reason"):
            detail = s["skip_reason"]
        if s.get("reused_from"):
            detail = "reused · " + detail  # a replay kept the output its source recorded
        table.add_row(s["step_id"], status_markup(s["status"]), str(s["attempts"]), str(s["items"] or ""), detail[:80])
    console.print(table)
    if r.get("error"):
        console.print(f"[red]failed:[/red] {r['error']['type']}: {r['error']['message']}", highlight=False)


def render_history(rows: list[dict[str, Any]]) -> None:
    table = Table("seq", "at", "type", "step", "attempt", "detail")
    for row in rows:
        step = row.get("step_id") or ""
        if row.get("item") is not None:
            step += f"#{row['item']}"
        detail = row.get("error_message") or row.get("reason") or ""
        if row["type"] in ("StepSucceeded", "ExecutionCompleted"):
            detail = orjson.dumps(row.get("output")).decode()[:60]
        table.add_row(str(row["seq"]), row["at"][11:23], row["type"], step, str(row.get("attempt", "")), detail)
    console.print(table)


def render_executions(rows: list[dict[str, Any]]) -> None:
    lineage = any(r.get("replay_of") for r in rows)
    table = Table("id", "workflow", "version", "status", "started", "finished", *(("replay of",) if lineage else ()))
    for r in rows:
        table.add_row(r["id"], r["workflow"], str(r["version"]), status_markup(r["status"]), r["started_at"][:19],
                      (r["finished_at"] or "")[:19], *(((r.get("replay_of") or "")[:8],) if lineage else ()))
    console.print(table)


def render_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("(none)")
        return
    table = Table(*rows[0].keys())
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    console.print(table)
