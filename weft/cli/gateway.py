"""CLI: `weft publish`, `weft gateway`, `weft triggers`, `weft scheduler`, `weft keys create|list|revoke`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from weft.cli import output as out
from weft.cli.common import (
    BAD_INPUT,
    NOT_FOUND,
    HomeOpt,
    JsonOpt,
    acting_user,
    app,
    json_arg,
    need_stack,
    run_service,
    settings_for,
    store_for,
)

keys_app = typer.Typer(no_args_is_help=True, help="API keys for the HTTP gateway.")
app.add_typer(keys_app, name="keys")


# ---- publishing a trigger ---------------------------------------------------------------------------


@app.command()
def publish(
    type_: str = typer.Argument(..., metavar="TYPE", help="Event type, e.g. order.created"),
    data: str = typer.Option("null", "--data", "-d", help="Event data as JSON, or @file.json."),
    id_: Optional[str] = typer.Option(None, "--id", help="Event id (default: a new UUID). (source, id) is the "
                                                          "idempotency key: the same pair starts a workflow once."),
    source: str = typer.Option("weft:cli", "--source", help="Event source."),
    subject: Optional[str] = typer.Option(None, "--subject", help="Event subject."),
    as_json: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
) -> None:
    """Publish a trigger event (a CloudEvent) onto its topic; print its id."""
    from pydantic import ValidationError

    from contracts.subjects import trigger_subject
    from services.broker import BrokerError
    from services.broker.connect import connect_transport
    from services.triggers.consumer import describe
    from services.triggers.publish import new_event
    from services.triggers.publish import publish as publish_event

    payload = json_arg("--data", data)
    try:
        event = new_event(type_, payload, id=id_, source=source, subject=subject)
    except ValidationError as exc:
        out.fail(2, describe(exc).replace("type:", "TYPE:"))
    settings = settings_for(home)
    need_stack(settings)  # one line saying none runs, as every command that needs the stack does
    if not settings.broker():
        out.fail(1, f"no broker: start `weft up` (home {settings.home}) or set WEFT_BROKER_URL")

    from contracts.payloads import PayloadError, measure

    try:  # over the payload maximum: refused before anything is stored or published
        size = len(measure(payload, settings.payload_limits(), "--data"))
    except PayloadError as exc:
        out.fail(2, str(exc))
    claims = None
    if size > settings.payload_limits().inline:  # goes by reference: the blob store is beside the events
        from services.payloads import Claims

        claims = Claims.on(store_for(home, settings), settings.payload_limits())

    async def send() -> bool:
        transport = await connect_transport(settings, connect_timeout=5, publish_retry_for=10)
        try:
            if settings.nats_user in (None, "admin"):  # a `publisher` may not make streams: it finds them made
                await transport.ensure_streams()
            # NatsTransport is not yet a Transport to mypy: its consumer's fetch() returns list[NatsDelivery]
            # where the port says list[Delivery] (the port drift of issue 17, fixed with the port itself).
            return await publish_event(transport, event, claims)  # type: ignore[arg-type]
        finally:
            await transport.close()
            if claims is not None:
                claims.blobs.store.close()  # type: ignore[attr-defined]

    try:
        stored = asyncio.run(send())
    except BrokerError as exc:
        out.fail(1, f"could not publish: {exc}")
    result = {"id": event.id, "source": event.source, "type": event.type, "subject": event.subject,
              "topic": trigger_subject(event.type), "duplicate": not stored}
    if as_json:
        out.emit(result, True)
        return
    sys.stdout.write(event.id + "\n")
    note = " (the broker already had this source and id: not published again)" if not stored else ""
    out.errors.print(f"published {event.type} from {event.source} on {result['topic']}{note}", highlight=False)


@app.command("trigger-types")
def trigger_types(as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """The CloudEvent types workflows subscribe to, each with its workflows and their input schema
    (as `GET /v1/triggers/types`): what a producer may send."""
    from services.triggers.routing import Catalog, subscribed_types

    with store_for(home) as store:
        catalog = Catalog(store)
        catalog.refresh(force=True)
        types = subscribed_types(catalog)
    if as_json:
        out.emit([{"id": t["type"], **t} for t in types], True)
        return
    out.render_table([{"type": t["type"], "workflows": ", ".join(
        f"{w['name']}@{w['version']}" + (" (filtered)" if w["filters"] else "") for w in t["workflows"]),
        "input requires": ", ".join(sorted({f for w in t["workflows"] for f in (w["input_schema"] or {}).get(
            "required", [])})) or "-"} for t in types])


# ---- services ---------------------------------------------------------------------------------------


@app.command()
def gateway(
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default 0: a free one)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without API keys (loopback addresses only)."),
    home: Optional[Path] = HomeOpt,
    log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL"),
) -> None:
    """Run the HTTP gateway (API keys required unless --no-auth on loopback)."""
    from services.gateway.auth import is_loopback

    flags: dict[str, Any] = {"gateway_host": host, "gateway_port": port, "nats_role": "gateway"}
    if no_auth:
        flags["gateway_auth"] = False
    settings = settings_for(home, **flags)
    if not settings.gateway_auth and not is_loopback(settings.gateway_host):
        out.fail(2, f"--no-auth: only on a loopback address, not {settings.gateway_host}")

    def announce(stack: Any) -> None:
        auth = "API keys required" if settings.gateway_auth else "auth OFF (loopback only): anyone on this machine may call it"
        out.errors.print(f"weft gateway · {stack.gateway.url}/v1 · {auth}", highlight=False)
        out.errors.print(f"  OpenAPI {stack.gateway.url}/v1/openapi.json · docs {stack.gateway.url}/v1/docs",
                         highlight=False)
        if settings.gateway_auth and not _any_key(stack.store):
            out.errors.print("  [yellow]no API keys yet:[/yellow] create one with `weft keys create --scopes admin`")

    run_service(("gateway",), home, log_level, settings=settings, on_ready=announce)


def _any_key(store: Any) -> bool:
    return bool(store.read(0, 1, types=["ApiKeyCreated"]))


@app.command()
def triggers(home: Optional[Path] = HomeOpt, log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL")) -> None:
    """Run the trigger consumer: events on weft.triggers.> start their workflows (any number of replicas)."""
    run_service(("triggers",), home, log_level)


@app.command()
def scheduler(home: Optional[Path] = HomeOpt, log_level: str = typer.Option("INFO", envvar="WEFT_LOG_LEVEL")) -> None:
    """Run the cron scheduler (any number of replicas: each tick starts once)."""
    run_service(("scheduler",), home, log_level)


# ---- keys -------------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    scopes: str = typer.Option(..., "--scopes", help="Comma-separated: read, trigger, admin (admin implies both)."),
    workflows: Optional[str] = typer.Option(None, "--workflows", help="Bind the key to these workflows (comma-separated)."),
    events: Optional[str] = typer.Option(None, "--events", help="With --workflows: the event types (comma-separated; "
                                         "'order.*' is a prefix, 'webhook:/path' a webhook) those workflows may "
                                         "subscribe to and backfill. Without it, none."),
    name: Optional[str] = typer.Option(None, "--name", help="A label, shown in `weft keys list`."),
    as_json: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
) -> None:
    """Create an API key. It is printed once: only its hash is stored."""
    from services.gateway.keys import KeyProblem, Keys

    store = store_for(home)
    try:
        token, key = Keys(store).create([scopes], workflows=workflows.split(",") if workflows else None,
                                        events=[events] if events is not None else None, name=name, by=acting_user())
    except KeyProblem as exc:
        out.fail(2, f"--{exc}")
    finally:
        store.close()
    result = key.public() | {"key": token}
    if as_json:
        out.emit(result, True)
        return
    sys.stdout.write(token + "\n")
    bound = f" · workflows {', '.join(result['workflows'])}" if result["workflows"] else ""
    if result["workflows"]:
        bound += f" · events {', '.join(result['events'] or ['(none)'])}"
    out.errors.print(f"key {result['prefix']} · scopes {', '.join(result['scopes'])}{bound}\n"
                     "  shown once: store it now (only its hash is kept)", highlight=False)


def _key_from(path: Optional[Path]) -> str:
    """The key a bootstrap secret file holds ("" for none or an empty file); exit 2 naming the
    file for anything that cannot be a key (a Weft key is 57 characters)."""
    if path is None or not path.is_file():
        return ""
    try:
        with open(path, "rb") as f:
            raw = f.read(4097)
    except OSError as exc:
        out.fail(2, f"--key-file {path}: {exc.strerror}")
    if len(raw) > 4096:
        out.fail(2, f"--key-file {path}: over 4096 bytes; it should hold one key (weft_<8 hex>_<43 base64url>)")
    try:
        return raw.decode().strip()
    except UnicodeDecodeError:
        out.fail(2, f"--key-file {path}: not UTF-8 text; it should hold one key (weft_<8 hex>_<43 base64url>)")


@keys_app.command("bootstrap")
def keys_bootstrap(
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="A file holding the first admin key "
                                            "(a compose or Kubernetes secret). Empty or missing: one is made "
                                            "and printed once."),
    as_json: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
) -> None:
    """A deployment's first admin key, once: does nothing when the store already has a key."""
    from services.gateway.keys import KeyProblem, Keys

    store = store_for(home)
    try:
        if _any_key(store):
            out.errors.print("weft keys bootstrap: the store has API keys already; nothing to do", highlight=False)
            if as_json:
                out.emit({"created": False}, True)
            return
        token = _key_from(key_file)
        try:
            made, key = Keys(store).create(["admin"], name="bootstrap", by=acting_user(), token=token or None)
        except KeyProblem as exc:
            out.fail(2, f"{key_file}: {exc}")
    finally:
        store.close()
    result = key.public() | {"created": True}
    if as_json:
        out.emit(result | ({} if token else {"key": made}), True)
        return
    if token:
        out.errors.print(f"admin key {result['prefix']} recorded from {key_file}", highlight=False)
    else:  # nobody has it yet: this is the one time it is shown
        sys.stdout.write(made + "\n")
        out.errors.print(f"admin key {result['prefix']} · shown once: store it now (only its hash is kept)",
                         highlight=False)


@keys_app.command("list")
def keys_list(as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Every key: prefix, scopes, binding, revoked or not (never the key itself)."""
    from services.gateway.keys import Keys

    with store_for(home) as store:
        rows = [k.public() for k in Keys(store).list()]
    out.emit(rows, as_json, render=lambda rs: out.render_table([
        {"id": r["id"], "prefix": r["prefix"], "scopes": ",".join(r["scopes"]),
         "workflows": ",".join(r["workflows"] or ["*"]),
         "events": ",".join(r["events"] or []) if r["workflows"] else "*",
         "name": r["name"] or "", "created": r["created_at"][:19],
         "active": "yes" if r["active"] else "revoked"} for r in rs]))


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id or prefix (weft_xxxxxxxx)."),
                as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """Revoke a key (recorded as an event). Gateways stop accepting it within seconds."""
    from services.gateway.keys import KeyProblem, Keys

    store = store_for(home)
    try:
        key = Keys(store).revoke(key_id, by=acting_user())
    except KeyProblem as exc:
        out.fail(NOT_FOUND if str(exc).startswith("no API key") else BAD_INPUT, str(exc))
    finally:
        store.close()
    out.emit(key.public(), as_json)
