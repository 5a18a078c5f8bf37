"""`weft dlq ...`: inspect, fix, reprocess and discard dead letters; `weft deadletters` runs the service.

    weft dlq list [--workflow W] [--step S] [--kind K] [--status S] [--since T] [--until T]
                  [--error-contains X] [--group-by error] [--json]
    weft dlq show ID [--json]
    weft dlq reprocess ID... | --all [filters] [--filter KEY=VALUE]... [--patch JSON] [--dry-run] [--json]
    weft dlq discard ID... | --all [filters] --reason TEXT [--json]
    weft dlq watch [filters] [--json]
    weft dlq stats [--json | --prometheus]

IDs may be shortened to any unique prefix (the table shows 8 characters).
Exit codes: 0 done, 1 not found / some item failed / cancelled, 2 bad input.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import orjson
import typer
from rich import box
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table

from weft import output as out
from weft.cli import HomeOpt, JsonOpt, _json_arg, _service, _settings, _store, _user, app

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: inspect, fix, reprocess, discard.")
app.add_typer(dlq_app, name="dlq")

WorkflowOpt = typer.Option(None, "--workflow", help="Only this workflow.")
StepOpt = typer.Option(None, "--step", help="Only this step id.")
KindOpt = typer.Option(None, "--kind", help="A kind (retries_exhausted, non_retryable, input_error, poison, "
                       "unknown_task, max_deliver, trigger_invalid, trigger_unroutable), or step / message.")
SinceOpt = typer.Option(None, "--since", help="Seen at or after: ISO time, or an age like 30m, 2h, 7d.")
UntilOpt = typer.Option(None, "--until", help="Seen before: ISO time, or an age like 30m, 2h, 7d.")
ErrorOpt = typer.Option(None, "--error-contains", help="Error type or message contains this (any case).")
FILTER_KEYS = ("workflow", "step", "kind", "since", "until", "error-contains")


@app.command()
def deadletters(home: Optional[Path] = HomeOpt, log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL")) -> None:
    """Run the dead-letter service: DLQ ingester, MaxDeliver capture, dead-letter view."""
    _service(("deadletters",), home, log_level)


# ---- helpers --------------------------------------------------------------------------------------


def _when(name: str, text: Optional[str]) -> Optional[str]:
    from services.deadletters.bulk import parse_when

    if text is None:
        return None
    try:
        return parse_when(text)
    except ValueError:
        out.fail(2, f"{name}: {text!r} is neither an ISO time (2024-05-01T12:00:00Z) nor an age (30m, 2h, 7d)")


def _filters(store: Any, *, workflow: Optional[str], step: Optional[str], kind: Optional[str], status: Optional[str],
             since: Optional[str], until: Optional[str], error_contains: Optional[str]) -> Any:
    from contracts import deadletters as dl
    from services.deadletters import Filters

    if status is not None and status not in (*dl.STATUSES, "all"):
        out.fail(2, f"--status: must be one of {', '.join(dl.STATUSES)} or all, not {status!r}")
    if kind is not None:
        with store.reader() as tx:
            tx.execute("SELECT DISTINCT kind FROM weft_dead_letters")
            known = {r[0] for r in tx.fetchall()} | set(dl.STEP_KINDS) | set(dl.MESSAGE_KINDS) | {"step", "message"}
        if kind not in known:
            out.fail(2, f"--kind: unknown kind {kind!r}; known: {', '.join(sorted(known))}")
    return Filters(
        workflow=workflow, step=step, kind=kind, status=None if status == "all" else status,
        since=_when("--since", since), until=_when("--until", until), error_contains=error_contains or None,
    )


def _open(home: Optional[Path]) -> Any:
    """The store, with the dead-letter view brought up to date (so a list right after a failure shows it)."""
    from services.deadletters.view import DeadLettersView, catch_up, ensure_view

    store = _store(home)
    view = DeadLettersView(store)
    ensure_view(store, view)
    catch_up(store, view)
    return store


def _rows(store: Any, filters: Any, limit: int | None = None) -> list[dict[str, Any]]:
    from services.deadletters import list_dead_letters

    rows: list[dict[str, Any]] = []
    page = 1000 if limit is None else min(limit, 1000)
    with store.reader() as tx:
        while limit is None or len(rows) < limit:
            batch = list_dead_letters(tx, filters, limit=page, offset=len(rows))
            rows += batch
            if len(batch) < page:
                break
    return rows if limit is None else rows[:limit]


def _resolve(store: Any, refs: list[str]) -> list[dict[str, Any]]:
    from services.deadletters import find

    rows, seen = [], set()
    with store.reader() as tx:
        for ref in refs:
            found = find(tx, ref)
            if not found:
                out.fail(1, f"no dead letter {ref!r}")
            if len(found) > 1:
                out.fail(2, f"{ref!r} is ambiguous: it starts {', '.join(r['id'] for r in found)}; give more characters")
            if found[0]["id"] not in seen:
                seen.add(found[0]["id"])
                rows.append(found[0])
    return rows


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "kind", "status", "workflow", "execution_id", "step_id", "item", "attempt", "error_type",
            "error_message", "reason", "delivered", "source", "source_subject", "first_seen", "last_seen", "actor",
            "action_reason")
    return {k: row.get(k) for k in keys}


def _step(row: dict[str, Any]) -> str:
    step = row.get("step_id") or ""
    return f"{step}#{row['item']}" if row.get("item") is not None else step


def _time(value: Optional[str]) -> str:
    return (value or "")[:19].replace("T", " ")


_COLOURS = {"open": "red", "reprocessed": "green", "discarded": "dim"}


def _status(s: str) -> str:
    return f"[{_COLOURS.get(s, 'white')}]{s}[/]"


def _progress(as_json: bool) -> Any:
    import os

    if as_json or not (sys.stderr.isatty() or os.environ.get("WEFT_PROGRESS")):
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=out.errors, transient=True)


# ---- list / show ------------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    workflow: Optional[str] = WorkflowOpt, step: Optional[str] = StepOpt, kind: Optional[str] = KindOpt,
    status: Optional[str] = typer.Option("open", "--status", help="open (default), reprocessed, discarded or all."),
    since: Optional[str] = SinceOpt, until: Optional[str] = UntilOpt, error_contains: Optional[str] = ErrorOpt,
    group_by: Optional[str] = typer.Option(None, "--group-by", help="error: one line per cluster of the same failure."),
    limit: int = typer.Option(100, "--limit", min=1, help="At most this many (newest first)."),
    as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt,
) -> None:
    """Dead letters, newest first."""
    from services.deadletters.view import group_by_error

    if group_by not in (None, "error"):
        out.fail(2, f"--group-by: only 'error' is supported, not {group_by!r}")
    store = _open(home)
    try:
        filters = _filters(store, workflow=workflow, step=step, kind=kind, status=status, since=since, until=until,
                           error_contains=error_contains)
        rows = _rows(store, filters, None if group_by else limit)
    finally:
        store.close()
    if group_by:
        groups = group_by_error(rows)
        out.emit(groups, as_json, render=_render_groups)
        return
    out.emit([_summary(r) for r in rows], as_json, render=lambda rs: _render_list(rs, filters))


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


def _short(value: Optional[str]) -> str:
    """Today's times as HH:MM:SS, older ones with their date."""
    text = _time(value)
    return text[11:] if text[:10] == datetime.now(timezone.utc).strftime("%Y-%m-%d") else text[5:16]


def _render_list(rows: list[dict[str, Any]], filters: Any) -> None:
    if not rows:
        out.console.print(f"no {filters.status or ''} dead letters".replace("  ", " "))
        return
    with_status = filters.status is None  # one status asked for: the column would say the same on every line
    names = ["id", "kind", *(["status"] if with_status else []), "workflow", "step", "att.", "error", "last seen"]
    cells = []
    for r in rows:
        error = f"{r['error_type']}: {r['error_message'] or ''}" if r.get("error_type") else (r.get("error_message") or "")
        cells.append([r["id"][:8], r["kind"], *([r["status"]] if with_status else []), r.get("workflow") or "",
                      _step(r), "" if r.get("attempt") is None else str(r["attempt"]),
                      error.splitlines()[0] if error else "", _short(r["last_seen"])])
    table, cells = _fit(names, cells, "error", optional=("last seen", "att.", "workflow"))
    kept = [str(c.header) for c in table.columns]
    for row in cells:
        table.add_row(*(_status(c) if kept[i] == "status" else escape(c) for i, c in enumerate(row)))
    out.console.print(table)
    what = f"{filters.status} " if filters.status else ""
    out.console.print(f"{len(rows)} {what}dead letter(s) · details: [bold]weft dlq show <id>[/bold]", highlight=False)


def _render_groups(groups: list[dict[str, Any]]) -> None:
    if not groups:
        out.console.print("no dead letters")
        return
    names = ["count", "kind", "error", "workflows", "steps", "last seen", "example"]
    cells = [[str(g["count"]), g["kind"], f"{g['error_type']}: {g['error']}" if g["error_type"] else g["error"],
              ", ".join(g["workflows"]), ", ".join(g["steps"]), _short(g["last_seen"]), g["example"][:8]] for g in groups]
    table, cells = _fit(names, cells, "error", optional=("last seen", "steps", "workflows"), wrap=True)
    for row in cells:
        table.add_row(*(escape(c) for c in row))
    out.console.print(table)
    out.console.print(f"{sum(g['count'] for g in groups)} dead letter(s) in {len(groups)} cluster(s) · "
                      "[bold]weft dlq list --error-contains TEXT[/bold] lists one", highlight=False)


@dlq_app.command("show")
def dlq_show(ref: str = typer.Argument(..., metavar="ID"), as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """One dead letter: payload, error, traceback, the execution's history around the failure."""
    from contracts import deadletters as dl
    from services.deadletters.actions import history_around

    store = _open(home)
    try:
        row = _resolve(store, [ref])[0]
        history = history_around(store, row)
        import uuid

        acts = [dl.decode(r.type, r.data).model_dump(mode="json") for r in store.load(uuid.UUID(row["id"]))]
    finally:
        store.close()
    payload: Any = row["payload"]
    if row["payload_encoding"] == "utf-8":
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError:
            pass
    result = {**row, "payload": payload, "history": history, "acts": acts}
    if row.get("execution_id") and history:
        result["hint"] = f"weft history {row['execution_id']}"
    out.emit(result, as_json, render=_render_show)


def _render_show(r: dict[str, Any]) -> None:
    c = out.console
    c.print(f"[bold]dead letter {r['id']}[/bold] · {r['kind']} · {_status(r['status'])}")
    facts = [("workflow", r.get("workflow")), ("execution", r.get("execution_id")), ("step", _step(r) or None),
             ("attempt", r.get("attempt")), ("deliveries", r.get("delivered")), ("source subject", r.get("source_subject")),
             ("idempotency key", r["details"].get("idempotency_key")), ("worker", r["details"].get("worker_id")),
             ("event", " ".join(f"{k} {r['details'][f'event_{k}']}" for k in ("type", "id", "source")
                                if r["details"].get(f"event_{k}")) or None),
             ("first seen", _time(r["first_seen"])), ("last seen", _time(r["last_seen"]))]
    if r["status"] != "open":
        facts += [(f"{r['status']} by", r.get("actor")), ("why", r.get("action_reason")), ("at", _time(r.get("acted_at")))]
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
    text = orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() if not isinstance(body, str) else body
    c.print(Panel(Syntax(text, "json" if not isinstance(body, str) else "text", word_wrap=True), title=title, title_align="left"))
    if r["details"].get("input_mapping") is not None and r["kind"] == "input_error":
        c.print(Panel(escape(orjson.dumps(r["details"]["input_mapping"]).decode()), title="input mapping", title_align="left"))
    if r.get("headers"):
        c.print(Panel("\n".join(f"{escape(k)}: {escape(str(v))}" for k, v in r["headers"].items()), title="headers", title_align="left"))
    if r.get("traceback"):
        import sysconfig

        from services.deadletters.view import user_frames

        # The step's own frames are what matter; the worker's and the standard library's are noise.
        weft_dir = Path(out.__file__).resolve().parent
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
            c.print(f"[dim]{_time(a['at'])}[/dim] {a['type']} by {escape(a['by'])}" + (f": {escape(a['why'])}" if a.get("why") else ""),
                    highlight=False)
    if r["status"] == "open":
        c.print(f"next: [bold]weft dlq reprocess {r['id'][:8]}[/bold] [--patch JSON]  or  "
                f"[bold]weft dlq discard {r['id'][:8]} --reason TEXT[/bold]", highlight=False)


# ---- reprocess / discard ----------------------------------------------------------------------


def _selection(store: Any, refs: list[str], select_all: bool, filter_pairs: list[str], **flags: Any) -> list[dict[str, Any]]:
    for pair in filter_pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("_", "-")
        if not sep or key not in FILTER_KEYS or not value:
            out.fail(2, f"--filter: expected KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}, not {pair!r}")
        name = key.replace("-", "_")
        if flags.get(name) is not None and flags[name] != value:
            out.fail(2, f"--filter {key}= and --{key} disagree")
        flags[name] = value
    filtering = any(v is not None for v in flags.values())
    if refs and (filtering or select_all):
        out.fail(2, "give dead letter ids, or --all / filters, not both")
    if refs:
        return _resolve(store, refs)
    if not (filtering or select_all):
        out.fail(2, "which dead letters? give their ids, or select open ones with filters (e.g. --workflow W) or --all")
    filters = _filters(store, status="open", **flags)
    return list(reversed(_rows(store, filters)))  # oldest first: the order they failed in


def _run_bulk(chunks: list[list[dict[str, Any]]], act: Any, as_json: bool, verb: str, resources: Any = None) -> list[Any]:
    """Run the batches with a progress bar; Ctrl-C stops before the next batch (see services.deadletters.bulk).
    `resources`, if given, is an async context manager entered first (the broker connection)."""
    from contextlib import AsyncExitStack

    from services.deadletters.bulk import run_batches

    total = sum(len(c) for c in chunks)

    async def main() -> list[Any]:
        loop, cancelled = asyncio.get_running_loop(), asyncio.Event()
        try:
            loop.add_signal_handler(signal.SIGINT, cancelled.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        progress = _progress(as_json) if total > 1 else None
        task = progress.add_task(verb, total=total) if progress else None
        async with AsyncExitStack() as stack:
            if resources is not None:
                await stack.enter_async_context(resources)
            if progress:
                stack.enter_context(progress)
            return await run_batches(chunks, act, cancelled=cancelled,
                                     progress=lambda n: progress.advance(task, n) if progress else None)

    return asyncio.run(main())


def _report(outcomes: list[Any], as_json: bool) -> None:
    if as_json:
        out.emit([o.as_dict() for o in outcomes], True)
    else:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for name in ("id", "kind", "execution", "step", "outcome"):
            table.add_column(name, no_wrap=True)
        table.add_column("detail", overflow="fold")
        shown = outcomes if len(outcomes) <= 50 else [o for o in outcomes if not o.ok]  # a big run: the trouble only
        for o in shown:
            colour = "green" if o.ok and not o.outcome.startswith("already") else "yellow" if o.ok else "red"
            detail = o.detail or (f"attempt {o.attempt} scheduled" if o.attempt else "")
            table.add_row(o.id[:8], o.kind, (o.execution_id or "")[:8], o.step_id or "", f"[{colour}]{o.outcome}[/]",
                          escape(detail[:200]))
        if shown:
            out.console.print(table)
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
        out.console.print(" · ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing to do", highlight=False)
        for o in outcomes:
            if o.preview is not None and o.outcome.startswith("would"):
                out.console.print(f"{o.id[:8]} would send:")
                out.console.print_json(orjson.dumps(o.preview).decode())
    raise typer.Exit(0 if all(o.ok for o in outcomes) else 1)


class _Broker:
    """The broker connection for republishing, opened inside the bulk run's event loop."""

    def __init__(self, home: Optional[Path], actions: Any):
        settings = _settings(home)
        if not settings.nats_url:
            out.fail(1, "republishing needs the broker, and no NATS url is known: run `weft up`, or set WEFT_NATS_URL")
        self.settings, self.actions = settings, actions

    async def __aenter__(self) -> Any:
        from services.broker import BrokerError, NatsTransport

        try:
            self.actions.transport = await NatsTransport.connect(
                self.settings.nats_url, namespace=self.settings.namespace, connect_timeout=5)
        except BrokerError as exc:
            out.fail(1, f"cannot republish: {exc}")
        return self.actions.transport

    async def __aexit__(self, *exc: object) -> None:
        if self.actions.transport is not None:
            await self.actions.transport.close()


@dlq_app.command("reprocess")
def dlq_reprocess(
    refs: Optional[list[str]] = typer.Argument(None, metavar="[ID]...", help="Dead letter ids (or unique prefixes)."),
    select_all: bool = typer.Option(False, "--all", help="Every open dead letter (narrow it with filters)."),
    filter_pairs: list[str] = typer.Option([], "--filter", metavar="KEY=VALUE", help=f"Select open ones: {', '.join(FILTER_KEYS)}."),
    workflow: Optional[str] = WorkflowOpt, step: Optional[str] = StepOpt, kind: Optional[str] = KindOpt,
    since: Optional[str] = SinceOpt, until: Optional[str] = UntilOpt, error_contains: Optional[str] = ErrorOpt,
    patch: Optional[str] = typer.Option(None, "--patch", help="RFC 7386 merge patch (JSON or @file) for the step's input, "
                                        "or for a message's payload."),
    why: Optional[str] = typer.Option(None, "--why", help="Recorded with the reprocess."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would happen; change nothing."),
    as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt,
) -> None:
    """Push dead letters through again: a new attempt for a step, a republish for a message."""
    from services.deadletters import Actions, PatchError
    from services.deadletters.bulk import batches

    patch_value = _json_arg("--patch", patch) if patch is not None else None
    store = _open(home)
    try:
        rows = _selection(store, list(refs or []), select_all, filter_pairs, workflow=workflow, step=step, kind=kind,
                          since=since, until=until, error_contains=error_contains)
        actions = Actions(store)
        for row in rows:  # every patch is checked before anything is stored
            try:
                actions.patched(row, patch_value)
            except PatchError as exc:
                out.fail(2, f"--patch for {row['id'][:8]}: {exc}")
        by = _user()
        needs_broker = not dry_run and any(r["source"] == "message" and r["status"] == "open" for r in rows)

        async def act(chunk: list[dict[str, Any]]) -> Any:
            if chunk[0]["source"] == "step":
                return await asyncio.to_thread(actions.reprocess_steps, chunk, patch_value, by, why, dry_run)
            return [await actions.reprocess(chunk[0], patch=patch_value, by=by, why=why, dry_run=dry_run)]

        outcomes = _run_bulk(batches(rows), act, as_json, "reprocessing", _Broker(home, actions) if needs_broker else None)
    finally:
        store.close()
    _report(outcomes, as_json)


@dlq_app.command("discard")
def dlq_discard(
    refs: Optional[list[str]] = typer.Argument(None, metavar="[ID]...", help="Dead letter ids (or unique prefixes)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (required; recorded with who did it)."),
    select_all: bool = typer.Option(False, "--all", help="Every open dead letter (narrow it with filters)."),
    filter_pairs: list[str] = typer.Option([], "--filter", metavar="KEY=VALUE", help=f"Select open ones: {', '.join(FILTER_KEYS)}."),
    workflow: Optional[str] = WorkflowOpt, step: Optional[str] = StepOpt, kind: Optional[str] = KindOpt,
    since: Optional[str] = SinceOpt, until: Optional[str] = UntilOpt, error_contains: Optional[str] = ErrorOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would happen; change nothing."),
    as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt,
) -> None:
    """Give up on dead letters, saying why. Recorded as an event; the execution stays failed."""
    from services.deadletters import Actions
    from services.deadletters.bulk import BATCH

    if not reason or not reason.strip():
        out.fail(2, "--reason: say why these are discarded (it is recorded with your name)")
    store = _open(home)
    try:
        rows = _selection(store, list(refs or []), select_all, filter_pairs, workflow=workflow, step=step, kind=kind,
                          since=since, until=until, error_contains=error_contains)
        actions = Actions(store)
        by = _user()

        async def act(chunk: list[dict[str, Any]]) -> Any:
            return await asyncio.to_thread(actions.discard_many, chunk, by=by, why=reason.strip(), dry_run=dry_run)

        outcomes = _run_bulk([rows[i : i + BATCH] for i in range(0, len(rows), BATCH)], act, as_json, "discarding")
    finally:
        store.close()
    _report(outcomes, as_json)


# ---- watch / stats ----------------------------------------------------------------------------


@dlq_app.command("watch")
def dlq_watch(
    workflow: Optional[str] = WorkflowOpt, step: Optional[str] = StepOpt, kind: Optional[str] = KindOpt,
    error_contains: Optional[str] = ErrorOpt,
    since: Optional[str] = typer.Option(None, "--since", help="Also show those seen since then (default: only new ones)."),
    interval: float = typer.Option(0.5, "--interval", min=0.05, help="Seconds between looks."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    home: Optional[Path] = HomeOpt,
) -> None:
    """Follow new dead letters as they arrive (Ctrl-C stops)."""
    from services.deadletters import list_dead_letters
    from services.deadletters.view import DeadLettersView, catch_up

    store = _open(home)
    view = DeadLettersView(store)
    filters = _filters(store, workflow=workflow, step=step, kind=kind, status=None, since=None, until=None,
                       error_contains=error_contains)
    start = _when("--since", since)
    with store.reader() as tx:
        if start is None:
            tx.execute("SELECT COALESCE(MAX(seq), 0) FROM weft_dead_letters")
            last = int(tx.fetchone()[0])  # type: ignore[index]
        else:
            tx.execute("SELECT COALESCE(MIN(seq), 0) - 1 FROM weft_dead_letters WHERE last_seen >= ?", (start,))
            last = int(tx.fetchone()[0])  # type: ignore[index]
    out.errors.print("watching for dead letters · Ctrl-C stops")  # stderr: --json keeps stdout pure
    try:
        while True:
            catch_up(store, view)
            with store.reader() as tx:
                rows = list_dead_letters(tx, filters, limit=500, after_seq=last, oldest_first=True)
            for r in rows:
                last = max(last, r["seq"])
                if as_json:
                    sys.stdout.write(orjson.dumps(_summary(r)).decode() + "\n")
                else:
                    error = f"{r['error_type']}: {r['error_message'] or ''}".splitlines()[0][:80]
                    out.console.print(f"{_time(r['last_seen'])} [bold]{r['id'][:8]}[/bold] {r['kind']} "
                                      f"{escape(r.get('workflow') or '-')} {escape(_step(r) or '-')} [red]{escape(error)}[/red]",
                                      highlight=False)
            sys.stdout.flush()
            if not rows:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


@dlq_app.command("stats")
def dlq_stats(
    prometheus: bool = typer.Option(False, "--prometheus", help="Prometheus exposition text."),
    as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt,
) -> None:
    """Open dead letters by kind and workflow (the `weft.dlq.open` metric), and totals by status."""
    from services.deadletters.metrics import prometheus_text
    from services.deadletters.view import open_counts, status_counts

    store = _open(home)
    try:
        with store.reader() as tx:
            counts = open_counts(tx)
            statuses = status_counts(tx)
    finally:
        store.close()
    if prometheus:
        sys.stdout.write(prometheus_text(counts))
        return
    result = {
        "open": [{"id": f"{k}/{w}", "kind": k, "workflow": w or None, "count": n} for k, w, n in counts],
        "by_status": {s: statuses.get(s, 0) for s in ("open", "reprocessed", "discarded")},
    }

    def render(r: dict[str, Any]) -> None:
        if not r["open"]:
            out.console.print("no open dead letters · " + " · ".join(f"{n} {s}" for s, n in r["by_status"].items()),
                              highlight=False)
            return
        table = Table("kind", "workflow", "open")
        for row in r["open"]:
            table.add_row(row["kind"], row["workflow"] or "", str(row["count"]))
        out.console.print(table)
        out.console.print(" · ".join(f"{n} {s}" for s, n in r["by_status"].items()), highlight=False)

    out.emit(result, as_json, render=render)
