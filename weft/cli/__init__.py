"""The `weft` command line (the console script `weft = weft.cli:main`).

Exit codes: 0 success, 1 the execution (or operation) failed or no stack runs, 2 bad input,
3 not found (weft/cli/common.py). A workflow is named NAME or NAME@VERSION everywhere.
Every command that reports takes --json and then prints JSON only; without it, control
commands print one line and `run --no-wait` the execution id.

The package, by module (dependencies point down this list, never up):

    __init__.py    registers every command group on the app (import order is help order); main()
    stack.py       up, orchestrator, relay, projector, worker (up.py: the embedded stack itself)
    executions.py  run, status, history, cancel, pause, resume, retry, executions list
    workflows.py   workflows publish|list|show
    dlq.py         deadletters, dlq ... (dlq_render.py draws its tables)
    history.py     projections, executions attempts|timeline, workflows stats, replay, backfill
    gateway.py     publish, gateway, triggers, scheduler, keys ...
    broker.py      broker init|config
    common.py      the Typer apps, shared options and helpers (settings, store, JSON arguments)
    output.py      Rich for people, plain JSON with --json

Step code imports weft.steps, never this package.
"""

from __future__ import annotations

# Each import registers its commands on the app; this order is the order `weft --help` lists them in.
from weft.cli import stack  # noqa: F401
from weft.cli import executions  # noqa: F401
from weft.cli import workflows  # noqa: F401
from weft.cli import dlq  # noqa: F401
from weft.cli import history  # noqa: F401
from weft.cli import gateway  # noqa: F401
from weft.cli import broker  # noqa: F401
from weft.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app()
