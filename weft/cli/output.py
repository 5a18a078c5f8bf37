"""How the CLI shows things: Rich for people, plain JSON with --json."""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence

import orjson
import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich import box
from rich.markup import escape
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
    table.columns[0].no_wrap = True  # a step id is never cut
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
    cols = [Col("seq", key=True, justify="right"), Col("at", drop=2), Col("type", key=True), Col("step", key=True),
            Col("attempt", drop=1), Col("detail")]
    cells = []
    for row in rows:
        step = row.get("step_id") or ""
        if row.get("item") is not None:
            step += f"#{row['item']}"
        detail = row.get("error_message") or row.get("reason") or ""
        if row["type"] in ("StepSucceeded", "ExecutionCompleted"):
            detail = orjson.dumps(row.get("output")).decode()[:60]
        cells.append([str(row["seq"]), row["at"][11:23], row["type"], escape(step), str(row.get("attempt", "")),
                      escape(detail)])
    fitted(cols, cells)


def render_executions(rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("(no executions)")
        return
    lineage = any(r.get("replay_of") for r in rows)
    cols = [Col("id", key=True), Col("workflow", key=True), Col("status"), Col("started", drop=2),
            Col("finished", drop=3), *((Col("replay of", key=True, drop=4),) if lineage else ())]
    fitted(cols, [[r["id"], f"{r['workflow']}@{r['version']}", status_markup(r["status"]),
                   r["started_at"][:19].replace("T", " "), (r["finished_at"] or "")[:19].replace("T", " "),
                   *((r.get("replay_of") or "",) if lineage else ())] for r in rows])


def render_table(rows: list[dict[str, Any]]) -> None:
    """Any list of flat rows: the first column is its id (never cut), the others fold, the last ones
    drop first on a narrow terminal."""
    if not rows:
        console.print("(none)")
        return
    names = list(rows[0].keys())
    cols = [Col(n, key=i == 0, drop=0 if i < 2 else i) for i, n in enumerate(names)]
    fitted(cols, [[escape(str(r[n])) for n in names] for r in rows])


# ---- tables that fit the terminal without cutting an id -----------------------------------------


@dataclass(frozen=True)
class Col:
    """A column of a fitted table. `key`: an id or a name, printed whole on one line, never cut or
    folded (people copy it). `drop`: 0 is always shown; on a narrow terminal the highest goes first."""

    header: str
    key: bool = False
    drop: int = 0
    justify: str = "left"


_SOFT_MIN = 12  # a non-key column folds, but not below this many characters (nor below its header)


def _need(cols: Sequence[Col], rows: Sequence[Sequence[str]], edge: int, gap: int) -> int:
    widths = []
    for i, c in enumerate(cols):
        longest = max([len(c.header)] + [len(Text.from_markup(r[i]).plain) for r in rows])
        widths.append(longest if c.key else max(len(c.header), min(_SOFT_MIN, longest)))
    return sum(widths) + gap * max(len(cols) - 1, 0) + edge


def fitted(cols: Sequence[Col], rows: Sequence[Sequence[str]], width: int | None = None) -> None:
    """Print rows (Rich markup) as a table as wide as the terminal: key columns whole, the others folding;
    when it cannot fit, drop columns by `drop` (saying which), then lose the box, and at last show each
    row as `header  value` lines, so an id is never cut whatever the width."""
    width = width or console.width
    keep = list(range(len(cols)))
    while _need([cols[i] for i in keep], rows, 4, 3) > width and any(cols[i].drop for i in keep):
        keep.remove(max((i for i in keep if cols[i].drop), key=lambda i: (cols[i].drop, i)))
    chosen = [cols[i] for i in keep]
    cells = [[r[i] for i in keep] for r in rows]
    hidden = [c.header for c in cols if c not in chosen]
    if _need(chosen, cells, 4, 3) <= width:
        table = Table(*(), show_lines=False)
    elif _need(chosen, cells, 0, 2) <= width:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    else:  # even without a box the ids do not fit side by side: one block per row
        label = max(len(c.header) for c in chosen)
        for n, row in enumerate(cells):
            if n:
                console.print()
            for c, value in zip(chosen, row):
                if label + 2 + len(Text.from_markup(value).plain) > width:  # the value on a line of its own
                    console.print(f"[bold]{escape(c.header)}[/bold]", highlight=False)
                    console.print(f"  {value}", soft_wrap=c.key, highlight=False)
                else:
                    console.print(f"[bold]{escape(c.header):<{label}}[/bold]  {value}", soft_wrap=c.key,
                                  highlight=False)
        _say_hidden(hidden)
        return
    for c in chosen:
        if c.key:
            table.add_column(c.header, no_wrap=True, justify=c.justify,  # type: ignore[arg-type]
                             min_width=max([len(c.header)] + [len(Text.from_markup(r[chosen.index(c)]).plain)
                                                              for r in cells]))
        else:
            table.add_column(c.header, overflow="fold", justify=c.justify)  # type: ignore[arg-type]
    for r in cells:
        table.add_row(*r)
    console.print(table)
    _say_hidden(hidden)


def _say_hidden(hidden: list[str]) -> None:
    if hidden:
        errors.print(f"[dim]not shown at this width: {', '.join(hidden)} (a wider terminal or --json shows "
                     "them)[/dim]", highlight=False, soft_wrap=True)
