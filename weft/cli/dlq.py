"""`weft dlq ...`: inspect, fix, reprocess and discard dead letters; `weft deadletters` runs the service.

    weft dlq list [--workflow W] [--step S] [--kind K] [--status S] [--since T] [--until T]
                  [--error-contains X] [--group-by error] [--json]
    weft dlq show ID [--json]
    weft dlq reprocess ID... | --all [filters] [--filter KEY=VALUE]... [--patch JSON] [--dry-run] [--json]
    weft dlq discard ID... | --all [filters] --reason TEXT [--json]
    weft dlq watch [filters] [--json]
    weft dlq stats [--json | --prometheus]

IDs may be shortened to any unique prefix (the table shows 8 characters).
Exit codes: 0 done, 1 some item failed / cancelled, 2 bad input, 3 not found.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import orjson
import typer

from contracts import deadletters as dl
from weft.cli import output as out
from weft.cli.common import (
    HomeOpt,
    JsonOpt,
    acting_user,
    app,
    json_arg,
    not_found,
    published,
    run_service,
    settings_for,
    store_for,
    workflow_ref,
)
from weft.cli.dlq_render import (
    progress_bar,
    render_groups,
    render_list,
    render_outcomes,
    render_show,
    render_stats,
    render_watch_line,
)

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: inspect, fix, reprocess, discard.")
app.add_typer(dlq_app, name="dlq")

WorkflowOpt = typer.Option(None, "--workflow", help="Only this workflow (NAME or NAME@VERSION).")
StepOpt = typer.Option(None, "--step", help="Only this step id.")
KindOpt = typer.Option(None, "--kind", help=f"A kind ({', '.join(dl.STEP_KINDS + dl.MESSAGE_KINDS)}), or step / message.")
SinceOpt = typer.Option(None, "--since", help="Seen at or after: ISO time, or an age like 30m, 2h, 7d.")
UntilOpt = typer.Option(None, "--until", help="Seen before: ISO time, or an age like 30m, 2h, 7d.")
ErrorOpt = typer.Option(None, "--error-contains", help="Error type or message contains this (any case).")
FILTER_KEYS = ("workflow", "step", "kind", "since", "until", "error-contains")
FILTER_HELP = f"Select open ones: {', '.join(FILTER_KEYS)}."


@app.command()
def deadletters(home: Optional[Path] = HomeOpt, log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL")) -> None:
    """Run the dead-letter service: DLQ ingester, MaxDeliver capture, dead-letter view."""
    run_service(("deadletters",), home, log_level)


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
    from services.deadletters import Filters
    from services.deadletters.view import kind_problem

    if workflow is not None:  # NAME@VERSION as everywhere; dead letters are kept per workflow name
        workflow, version = workflow_ref(workflow, "--workflow")
        published(store, workflow, version)  # exit 3 for a typo, not an empty table
        if version is not None:
            out.errors.print(f"dead letters are listed per workflow: {workflow}, all versions", highlight=False)

    if status is not None and status not in (*dl.STATUSES, "all"):
        out.fail(2, f"--status: must be one of {', '.join(dl.STATUSES)} or all, not {status!r}")
    with store.reader() as tx:
        problem = kind_problem(tx, kind)
    if problem:
        out.fail(2, f"--kind: {problem}")
    return Filters(
        workflow=workflow, step=step, kind=kind, status=None if status == "all" else status,
        since=_when("--since", since), until=_when("--until", until), error_contains=error_contains or None,
    )


@contextmanager
def _open(home: Optional[Path]) -> Iterator[Any]:
    """The store, with the dead-letter view brought up to date (so a list right after a failure shows it)."""
    from services.deadletters.view import refresh

    with store_for(home) as store:
        refresh(store)
        yield store


def _rows(store: Any, filters: Any, limit: int | None = None) -> list[dict[str, Any]]:
    from services.deadletters import list_dead_letters

    with store.reader() as tx:
        return list_dead_letters(tx, filters, limit=limit)


def _resolve(store: Any, refs: list[str]) -> list[dict[str, Any]]:
    from services.deadletters import find

    rows, seen = [], set()
    with store.reader() as tx:
        for ref in refs:
            found = find(tx, ref)
            if not found:
                not_found(f"no dead letter {ref!r}")
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
    with _open(home) as store:
        filters = _filters(store, workflow=workflow, step=step, kind=kind, status=status, since=since, until=until,
                           error_contains=error_contains)
        rows = _rows(store, filters, None if group_by else limit)
    if group_by:
        groups = group_by_error(rows)
        out.emit(groups, as_json, render=render_groups)
        return
    out.emit([_summary(r) for r in rows], as_json, render=lambda rs: render_list(rs, filters))


@dlq_app.command("show")
def dlq_show(ref: str = typer.Argument(..., metavar="ID"), as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """One dead letter: payload, error, traceback, the execution's history around the failure."""
    from services.deadletters.actions import detail

    with _open(home) as store:
        result = detail(store, _resolve(store, [ref])[0])
    if result.get("execution_id") and result["history"]:
        result["hint"] = f"weft history {result['execution_id']}"
    out.emit(result, as_json, render=render_show)


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
        progress = progress_bar(as_json) if total > 1 else None
        task = progress.add_task(verb, total=total) if progress else None
        async with AsyncExitStack() as stack:
            if resources is not None:
                await stack.enter_async_context(resources)
            if progress:
                stack.enter_context(progress)
            return await run_batches(chunks, act, cancelled=cancelled,
                                     progress=lambda n: progress.advance(task, n) if progress and task is not None else None)

    return asyncio.run(main())


def _report(outcomes: list[Any], as_json: bool) -> None:
    if as_json:
        out.emit([o.as_dict() for o in outcomes], True)
    else:
        render_outcomes(outcomes)
    raise typer.Exit(0 if all(o.ok for o in outcomes) else 1)


class _Broker:
    """The broker connection for republishing, opened inside the bulk run's event loop."""

    def __init__(self, home: Optional[Path], actions: Any):
        settings = settings_for(home)
        if not settings.broker():
            out.fail(1, "republishing needs the broker, and none is known: run `weft up`, or set WEFT_BROKER_URL")
        self.settings, self.actions = settings, actions

    async def __aenter__(self) -> Any:
        from services.broker import BrokerError
        from services.broker.connect import connect_transport

        try:
            self.actions.transport = await connect_transport(self.settings, connect_timeout=5)
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
    filter_pairs: list[str] = typer.Option([], "--filter", metavar="KEY=VALUE", help=FILTER_HELP),
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

    patch_value = json_arg("--patch", patch) if patch is not None else None
    with _open(home) as store:
        rows = _selection(store, list(refs or []), select_all, filter_pairs, workflow=workflow, step=step, kind=kind,
                          since=since, until=until, error_contains=error_contains)
        actions = Actions(store)
        for row in rows:  # every patch is checked before anything is stored
            try:
                actions.patched(row, patch_value)
            except PatchError as exc:
                out.fail(2, f"--patch for {row['id'][:8]}: {exc}")
        by = acting_user()
        needs_broker = not dry_run and any(r["source"] == "message" and r["status"] == "open" for r in rows)

        async def act(chunk: list[dict[str, Any]]) -> Any:
            if chunk[0]["source"] == "step":
                return await asyncio.to_thread(actions.reprocess_steps, chunk, patch_value, by, why, dry_run)
            return [await actions.reprocess(chunk[0], patch=patch_value, by=by, why=why, dry_run=dry_run)]

        outcomes = _run_bulk(batches(rows), act, as_json, "reprocessing", _Broker(home, actions) if needs_broker else None)
    _report(outcomes, as_json)


@dlq_app.command("discard")
def dlq_discard(
    refs: Optional[list[str]] = typer.Argument(None, metavar="[ID]...", help="Dead letter ids (or unique prefixes)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (required; recorded with who did it)."),
    select_all: bool = typer.Option(False, "--all", help="Every open dead letter (narrow it with filters)."),
    filter_pairs: list[str] = typer.Option([], "--filter", metavar="KEY=VALUE", help=FILTER_HELP),
    workflow: Optional[str] = WorkflowOpt, step: Optional[str] = StepOpt, kind: Optional[str] = KindOpt,
    since: Optional[str] = SinceOpt, until: Optional[str] = UntilOpt, error_contains: Optional[str] = ErrorOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would happen; change nothing."),
    as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt,
) -> None:
    """Give up on dead letters, saying why. Recorded as an event; the execution stays failed."""
    from services.deadletters import Actions
    from services.deadletters.bulk import chunked

    if not reason or not reason.strip():
        out.fail(2, "--reason: say why these are discarded (it is recorded with your name)")
    with _open(home) as store:
        rows = _selection(store, list(refs or []), select_all, filter_pairs, workflow=workflow, step=step, kind=kind,
                          since=since, until=until, error_contains=error_contains)
        actions = Actions(store)
        by = acting_user()

        async def act(chunk: list[dict[str, Any]]) -> Any:
            return await asyncio.to_thread(actions.discard_many, chunk, by=by, why=reason.strip(), dry_run=dry_run)

        outcomes = _run_bulk(chunked(rows), act, as_json, "discarding")
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
    from services.deadletters.view import FreshView, seq_before

    with _open(home) as store, FreshView(store) as view:
        filters = _filters(store, workflow=workflow, step=step, kind=kind, status=None, since=None, until=None,
                           error_contains=error_contains)
        with store.reader() as tx:
            last = seq_before(tx, _when("--since", since))
        out.errors.print("watching for dead letters · Ctrl-C stops")  # stderr: --json keeps stdout pure
        try:
            while True:
                view.refresh(limit=None)
                with store.reader() as tx:
                    rows = list_dead_letters(tx, filters, limit=500, after_seq=last, oldest_first=True)
                for r in rows:
                    last = max(last, r["seq"])
                    if as_json:
                        sys.stdout.write(orjson.dumps(_summary(r)).decode() + "\n")
                    else:
                        render_watch_line(r)
                sys.stdout.flush()
                if not rows:
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass


@dlq_app.command("stats")
def dlq_stats(
    prometheus: bool = typer.Option(False, "--prometheus", help="Prometheus exposition text."),
    as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt,
) -> None:
    """Open dead letters by kind and workflow (the `weft.dlq.open` metric), and totals by status."""
    from services.deadletters.metrics import prometheus_text
    from services.deadletters.view import open_counts, stats

    with _open(home) as store, store.reader() as tx:
        if prometheus:
            sys.stdout.write(prometheus_text(open_counts(tx)))
            return
        result = stats(tx)
    out.emit(result, as_json, render=render_stats)
