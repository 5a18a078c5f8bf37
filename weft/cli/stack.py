"""`weft up` and the commands that run one service each: orchestrator, relay, projector, worker."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from weft.cli.common import HomeOpt, StepsOpt, app, configure_logging, run_service, settings_for


@app.command()
def up(
    home: Optional[Path] = HomeOpt,
    nats_port: int = typer.Option(0, help="NATS port (0: a free one)."),
    broker: Optional[str] = typer.Option(
        None, "--broker", envvar="WEFT_BROKER_URL",
        help="Run on this broker instead of an embedded NATS: kafka://host:port[,host:port...] (or nats://...)."),
    concurrency: Optional[int] = typer.Option(None, help="Worker concurrency (default 16, or WEFT_WORKER_CONCURRENCY)."),
    no_worker: Optional[bool] = typer.Option(None, "--no-worker", help="Run no worker (in this process or beside it)."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=0, max=64,
        help="Worker processes beside this one (0: the worker runs in this process). "
             "Default: WEFT_WORKER_PROCESSES, or one per core beyond the first."),
    steps: Optional[str] = StepsOpt,
    log_level: str = typer.Option("WARNING", envvar="WEFT_LOG_LEVEL"),
) -> None:
    """Run the whole stack on embedded defaults: NATS + SQLite + all services (or on --broker kafka://...)."""
    from weft.cli.up import run_up

    configure_logging(log_level)
    settings = settings_for(home, nats_port=nats_port or None, worker_concurrency=concurrency, no_worker=no_worker,
                            step_modules=steps, broker_url=broker, worker_processes=workers)
    # Only a broker asked for now counts: one a previous `weft up` wrote into the home is not a choice.
    raise typer.Exit(run_up(settings, broker=settings.broker_url if broker else None, log_level=log_level))


@app.command()
def orchestrator(home: Optional[Path] = HomeOpt, log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL")) -> None:
    """Run the result consumer (any number of replicas)."""
    run_service(("orchestrator",), home, log_level)


@app.command()
def relay(home: Optional[Path] = HomeOpt, log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL")) -> None:
    """Run the outbox relay."""
    run_service(("relay",), home, log_level)


@app.command()
def projector(home: Optional[Path] = HomeOpt, log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL")) -> None:
    """Run the projections (status views)."""
    run_service(("projector",), home, log_level)


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
    run_service(("worker",), home, log_level, worker_concurrency=concurrency, step_modules=steps)
