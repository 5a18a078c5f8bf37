"""CLI: `weft broker init` (make the streams, as admin) and `weft broker config` (the server's users).

A deployment's services run with their role's broker credentials only, and no role but
admin may create streams: `weft broker init` runs once, before them (infra/docker-compose.yml).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Optional

import typer

from weft.cli import output as out
from weft.cli.common import HomeOpt, app, settings_for

broker_app = typer.Typer(no_args_is_help=True, help="The broker: streams and users.")
app.add_typer(broker_app, name="broker")


@broker_app.command("init")
def init(home: Optional[Path] = HomeOpt) -> None:
    """Create (or update) the streams; needs the admin role (WEFT_NATS_USER=admin)."""
    from services.broker import BrokerError
    from services.broker.connect import connect_transport

    settings = settings_for(home)
    if not settings.broker():
        out.fail(1, "no broker: set WEFT_BROKER_URL (and, on NATS, WEFT_NATS_USER / WEFT_NATS_PASSWORD_FILE)")

    async def main() -> None:
        transport = await connect_transport(settings, connect_timeout=10, publish_retry_for=10)
        try:
            await transport.ensure_streams()
        finally:
            await transport.close()

    try:
        asyncio.run(main())
    except (BrokerError, ValueError) as exc:
        out.fail(1, f"could not create the streams: {exc}")
    out.errors.print(f"streams ready on {settings.broker()}", highlight=False)


@broker_app.command("config")
def config(
    namespace: str = typer.Option("", help="The namespace the services run with (WEFT_NAMESPACE)."),
) -> None:
    """Print the nats-server `authorization` block: one user per role, passwords from the environment."""
    from services.broker.nats_auth import ROLES, authorization_block

    sys.stdout.write(authorization_block({r: f"$WEFT_NATS_{r.upper()}_PASSWORD" for r in ROLES}, namespace) + "\n")
