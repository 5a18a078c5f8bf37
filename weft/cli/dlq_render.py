"""How `weft dlq` shows dead letters to people: Rich tables, panels and progress.

Nothing here reads the store or decides anything: each function gets what a
command (weft/cli/dlq.py) already built, the same value `--json` prints, and
draws it on the console.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import orjson
from rich import box
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table

from weft.cli import output as out

_COLOURS = {"open": "red", "reprocessed": "green", "discarded": "dim"}


def step_label(row: dict[str, Any]) -> str:
    step = row.get("step_id") or ""
    return f"{step}#{row['item']}" if row.get("item") is not None else step


def time_text(value: Optional[str]) -> str:
    return (value or "")[:19].replace("T", " ")


def short_time(value: Optional[str]) -> str:
    """Today's times as HH:MM:SS, older ones with their date."""
    text = time_text(value)
    return text[11:] if text[:10] == datetime.now(timezone.utc).strftime("%Y-%m-%d") else text[5:16]


def status_text(s: str) -> str:
    return f"[{_COLOURS.get(s, 'white')}]{s}[/]"


def progress_bar(as_json: bool) -> Progress | None:
    if as_json or not (sys.stderr.isatty() or os.environ.get("WEFT_PROGRESS")):
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=out.errors, transient=True)


def _fit(names: list[str], rows: list[list[str]], flex: str, optional: tuple[str, ...] = (),
         wrap: bool = False) -> tuple[Table, list[list[str]]]:
    """A table that fits the terminal: every column whole, except `flex`, which is cut with an
    ellipsis (or wrapped); on a narrow terminal the `optional` columns go first."""
    keep = list(range(len(names)))
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]

    def room() -> int:
        return out.console.width - sum(widths[i] for i in keep if names[i] != flex) - 3 * (len(keep) - 1)

    for name in optional:
        if room() >= 24:
            break
        keep.remove(names.index(name))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i in keep:
        if names[i] == flex:
            width = max(room(), 12)
            table.add_column(names[i], no_wrap=not wrap, overflow="fold" if wrap else "ellipsis", max_width=width,
                             min_width=min(width, widths[i]))
        else:
            table.add_column(names[i], no_wrap=True, min_width=widths[i])
    return table, [[r[i] for i in keep] for r in rows]


def render_list(rows: list[dict[str, Any]], filters: Any) -> None:
    if not rows:
        out.console.print(f"no {filters.status or ''} dead letters".replace("  ", " "))
        return
    with_status = filters.status is None  # one status asked for: the column would say the same on every line
    names = ["id", "kind", *(["status"] if with_status else []), "workflow", "step", "att.", "error", "last seen"]
    cells = []
    for r in rows:
        error = f"{r['error_type']}: {r['error_message'] or ''}" if r.get("error_type") else (r.get("error_message") or "")
        cells.append([r["id"][:8], r["kind"], *([r["status"]] if with_status else []), r.get("workflow") or "",
                      step_label(r), "" if r.get("attempt") is None else str(r["attempt"]),
                      error.splitlines()[0] if error else "", short_time(r["last_seen"])])
    table, cells = _fit(names, cells, "error", optional=("last seen", "att.", "workflow"))
    kept = [str(c.header) for c in table.columns]
    for row in cells:
        table.add_row(*(status_text(c) if kept[i] == "status" else escape(c) for i, c in enumerate(row)))
    out.console.print(table)
    what = f"{filters.status} " if filters.status else ""
    out.console.print(f"{len(rows)} {what}dead letter(s) · details: [bold]weft dlq show <id>[/bold]", highlight=False)


def render_groups(groups: list[dict[str, Any]]) -> None:
    if not groups:
        out.console.print("no dead letters")
        return
    names = ["count", "kind", "error", "workflows", "steps", "last seen", "example"]
    cells = [[str(g["count"]), g["kind"], f"{g['error_type']}: {g['error']}" if g["error_type"] else g["error"],
              ", ".join(g["workflows"]), ", ".join(g["steps"]), short_time(g["last_seen"]), g["example"][:8]] for g in groups]
    table, cells = _fit(names, cells, "error", optional=("last seen", "steps", "workflows"), wrap=True)
    for row in cells:
        table.add_row(*(escape(c) for c in row))
    out.console.print(table)
    out.console.print(f"{sum(g['count'] for g in groups)} dead letter(s) in {len(groups)} cluster(s) · "
                      "[bold]weft dlq list --error-contains TEXT[/bold] lists one", highlight=False)


def render_show(r: dict[str, Any]) -> None:
    c = out.console
    c.print(f"[bold]dead letter {r['id']}[/bold] · {r['kind']} · {status_text(r['status'])}")
    facts = [("workflow", r.get("workflow")), ("execution", r.get("execution_id")), ("step", step_label(r) or None),
             ("attempt", r.get("attempt")), ("deliveries", r.get("delivered")), ("source subject", r.get("source_subject")),
             ("idempotency key", r["details"].get("idempotency_key")), ("worker", r["details"].get("worker_id")),
             ("event", " ".join(f"{k} {r['details'][f'event_{k}']}" for k in ("type", "id", "source")
                                if r["details"].get(f"event_{k}")) or None),
             ("first seen", time_text(r["first_seen"])), ("last seen", time_text(r["last_seen"]))]
    if r["status"] != "open":
        facts += [(f"{r['status']} by", r.get("actor")), ("why", r.get("action_reason")), ("at", time_text(r.get("acted_at")))]
    grid = Table.grid(padding=(0, 2))
    for k, v in facts:
        if v not in (None, ""):
            grid.add_row(f"[dim]{k}[/dim]", escape(str(v)))
    c.print(grid)
    c.print()
    c.print(f"[red bold]{escape(r.get('error_type') or 'error')}[/red bold]: {escape(r.get('error_message') or '')}", highlight=False)
    if r.get("reason") and r.get("reason") != r.get("error_message"):
        c.print(f"[dim]why dead-lettered:[/dim] {escape(r['reason'])}", highlight=False)
    title = "payload (the step's input)" if r["source"] == "step" else f"payload ({r['payload_encoding']})"
    if r["kind"] == "input_error":
        title = "the execution's input (the step's input mapping could not be computed from it)"
    body = r["payload"]
    headers = r.get("headers") or {}
    if headers.get("Weft-Payload-Truncated"):  # an oversized message: the letter holds its first bytes
        title = (f"payload preview: the first {len(str(body))} of {headers.get('Weft-Payload-Size')} bytes "
                 f"(whole bytes {headers['Weft-Payload-Truncated']} in the blob store, "
                 f"SHA-256 {str(headers.get('Weft-Payload-Sha256'))[:16]}…)")
    text = orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() if not isinstance(body, str) else body
    c.print(Panel(Syntax(text, "json" if not isinstance(body, str) else "text", word_wrap=True), title=title, title_align="left"))
    if r["details"].get("input_mapping") is not None and r["kind"] == "input_error":
        c.print(Panel(escape(orjson.dumps(r["details"]["input_mapping"]).decode()), title="input mapping", title_align="left"))
    if r.get("headers"):
        c.print(Panel("\n".join(f"{escape(k)}: {escape(str(v))}" for k, v in r["headers"].items()), title="headers", title_align="left"))
    if r.get("traceback"):
        from services.deadletters.view import user_frames

        # The step's own frames are what matter; the worker's and the standard library's are noise.
        weft_dir = Path(__file__).resolve().parents[1]
        hide = [str(weft_dir) + "/", str(weft_dir.parent / "services") + "/", sysconfig.get_paths()["stdlib"] + "/"]
        text, hidden = user_frames(r["traceback"], hide)
        title = "traceback" + (f" ({hidden} frames of weft and the standard library hidden; --json has all)" if hidden else "")
        c.print(Panel(Syntax(text, "pytb", word_wrap=True), title=title, title_align="left"))
    if r.get("history"):
        c.print("[bold]history around the failure[/bold]")
        out.render_history(r["history"])
    if r.get("hint"):
        c.print(f"full history: [bold]{r['hint']}[/bold]", highlight=False)
    for a in r.get("acts") or []:
        if a["type"] in ("DeadLetterReprocessed", "DeadLetterDiscarded"):
            c.print(f"[dim]{time_text(a['at'])}[/dim] {a['type']} by {escape(a['by'])}" + (f": {escape(a['why'])}" if a.get("why") else ""),
                    highlight=False)
    if r["status"] == "open":
        c.print(f"next: [bold]weft dlq reprocess {r['id'][:8]}[/bold] [--patch JSON]  or  "
                f"[bold]weft dlq discard {r['id'][:8]} --reason TEXT[/bold]", highlight=False)


def render_outcomes(outcomes: list[Any]) -> None:
    """What a reprocess or discard did, one line per dead letter (only the trouble in a big run)."""
    # The dead letter's 8-character prefix is an id the dlq commands take; the execution's id is shown
    # whole (never cut), or, on a terminal too narrow for it, not at all (saying so).
    cols = [out.Col("id", key=True), out.Col("kind", drop=1), out.Col("execution", key=True, drop=2),
            out.Col("step", key=True), out.Col("outcome", key=True), out.Col("detail")]
    shown = outcomes if len(outcomes) <= 50 else [o for o in outcomes if not o.ok]  # a big run: the trouble only
    rows = []
    for o in shown:
        colour = "green" if o.ok and not o.outcome.startswith("already") else "yellow" if o.ok else "red"
        detail = o.detail or (f"attempt {o.attempt} scheduled" if o.attempt else "")
        rows.append([o.id[:8], o.kind, o.execution_id or "", escape(o.step_id or ""), f"[{colour}]{o.outcome}[/]",
                     escape(detail[:200])])
    if shown:
        out.fitted(cols, rows)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.outcome] = counts.get(o.outcome, 0) + 1
    out.console.print(" · ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing to do", highlight=False)
    for o in outcomes:
        if o.preview is not None and o.outcome.startswith("would"):
            out.console.print(f"{o.id[:8]} would send:")
            out.console.print_json(orjson.dumps(o.preview).decode())


def render_watch_line(r: dict[str, Any]) -> None:
    error = f"{r['error_type']}: {r['error_message'] or ''}".splitlines()[0][:80]
    out.console.print(f"{time_text(r['last_seen'])} [bold]{r['id'][:8]}[/bold] {r['kind']} "
                      f"{escape(r.get('workflow') or '-')} {escape(step_label(r) or '-')} [red]{escape(error)}[/red]",
                      highlight=False)


def render_stats(r: dict[str, Any]) -> None:
    if not r["open"]:
        out.console.print("no open dead letters · " + " · ".join(f"{n} {s}" for s, n in r["by_status"].items()),
                          highlight=False)
        return
    table = Table("kind", "workflow", "open")
    for row in r["open"]:
        table.add_row(row["kind"], row["workflow"] or "", str(row["count"]))
    out.console.print(table)
    out.console.print(" · ".join(f"{n} {s}" for s, n in r["by_status"].items()), highlight=False)
