"""`/v1/triggers` (publish a CloudEvent onto its topic), `/v1/webhooks/{path}`, `/v1/keys`."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Header, Path, Request
from contracts.cloudevents import BindingError, http_mode
from services.broker import BrokerError, MessageRejected
from services.gateway import events_in
from services.gateway.auth import ScopedRoute, caller, scoped, who
from services.gateway.errors import ApiError, errors
from services.gateway.keys import KeyProblem
from services.gateway.models import KeyCreate, KeyList, KeyOut, TriggerBatchOut, TriggerOut, TriggerTypeList, WebhookOut
from services.triggers.ingest import Trigger
from services.triggers.publish import dead_letter_rejected, encode, publish
from services.triggers.routing import subscribed_types
from services.triggers.webhooks import (
    WebhookError, claim_signature, delivery_id, secret_for, signature, verify, webhook_event,
)

log = logging.getLogger("weft.gateway")
router = APIRouter(prefix="/v1", route_class=ScopedRoute)

# One answer for an unknown path, a missing or bad signature, and an unsigned webhook called
# without a key: webhook paths cannot be told apart from outside.
_NOT_ACCEPTED = (401, "unauthorized", "no webhook accepts this request: sign it (X-Weft-Signature: t=<unix time>,"
                 "v1=<hex HMAC-SHA256 of \"<t>.<body>\">), or for an unsigned webhook send an API key with the "
                 "'trigger' scope")


@router.post("/triggers", status_code=202, response_model=TriggerOut | TriggerBatchOut, tags=["triggers"],
             responses={**errors(), 207: {"model": TriggerBatchOut, "description": "A batch in which some events "
                                          "were not accepted: each item has its own status and error"}},
             openapi_extra={**scoped("trigger"), "requestBody": events_in.REQUEST_BODY})
async def publish_trigger(request: Request) -> Any:
    """Publish CloudEvents onto their topics (`weft.triggers.<type>`), in any HTTP content mode:
    structured (`application/cloudevents+json`), binary (`ce-*` headers, the body is the data),
    batch (`application/cloudevents-batch+json`, at most 1,000 events, answered per event), or
    Weft's shorthand (`application/json`, `id` and `source` optional: a fresh id and `weft:api`).
    Every workflow subscribed to an event's type (and whose filter matches) starts once per
    (source, id), however often it is published."""
    ctx = request.app.state.ctx
    body = await request.body()
    limits = events_in.limits_of(ctx)
    headers = request.headers.raw
    mode = http_mode(headers)
    if mode == "batch":
        return await events_in.publish_batch(ctx, caller(request), body, limits)
    try:
        event = events_in.decode_one(mode, headers, body, limits)
    except BindingError as exc:
        raise events_in.refusal(exc) from None
    why = await events_in.forbidden(ctx, caller(request), event.type)
    if why:
        raise ApiError(403, why)
    try:
        stored = await publish(ctx.transport, event, ctx.executions.claims)  # big data goes by reference
    except MessageRejected:
        raise
    except BrokerError as exc:
        # The broker's client may still deliver this attempt once it reconnects: a retry is safe only
        # under the same (source, id), so say which, including the id we made up for the shorthand.
        log.warning("trigger %s/%s not published: %s", event.source, event.id, exc)
        raise ApiError(503, f"the broker is unreachable; send the event again with source {event.source!r} and id "
                            f"{event.id!r} (it then starts its workflows once, even if this attempt arrives late)",
                       headers={"Retry-After": "1"},
                       problems=[{"field": "body.id", "message": event.id}]) from None
    return events_in.accepted(event, stored)


@router.get("/triggers/types", response_model=TriggerTypeList, responses=errors(), tags=["triggers"],
            openapi_extra=scoped("read"))
async def trigger_types(request: Request) -> Any:
    """The CloudEvent types workflows subscribe to: for each, its topic and the workflows (latest
    version) it starts, with the JSON Schema their input (the event's data) must meet and any
    filter. A key bound to workflows sees only those, and the types they subscribe to."""
    ctx = request.app.state.ctx
    await asyncio.to_thread(ctx.catalog.refresh, force=True)  # a producer asks after publishing a workflow
    return {"items": subscribed_types(ctx.catalog, caller(request).workflows)}



def _unset_secret(name: str | None, auth: bool) -> str:
    """The 503 for a signed webhook whose secret is not set. With auth off (`weft up` on loopback:
    whoever calls is on this machine, usually the operator) it names the variable to set and where;
    a gateway that requires keys does not tell an anonymous caller its variables' names (its log does)."""
    if auth:
        return "this webhook's secret is not configured on the gateway (its log names the variable to set)"
    return (f"this webhook's secret is not configured on the gateway: set {name} (or {name}_FILE, a file "
            "holding it) in the environment of `weft up` (or `weft gateway`) and start it again")


@router.post(
    "/webhooks/{path:path}", status_code=202, response_model=WebhookOut, tags=["triggers"],
    responses=errors(404, 409),
    openapi_extra={"requestBody": {"required": False, "content": {
        "application/json": {"schema": {}}, "text/plain": {"schema": {"type": "string"}}}}},
)
async def webhook(
    request: Request, path: str = Path(max_length=512, description="the `webhook.path`"),
    x_weft_signature: str | None = Header(None, max_length=700, description="t=<unix time>,v1=<hex HMAC-SHA256 of "
                                          "\"<t>.<raw body>\"> with the webhook's secret; within webhook_tolerance"),
    x_weft_delivery: str | None = Header(None, max_length=256, description="delivery id: deduplicates retries"),
    idempotency_key: str | None = Header(None, max_length=256, description="used when X-Weft-Delivery is absent"),
) -> Any:
    """Start the workflows listening on this path. Signed webhooks (a `secret_env` in the definition)
    need a valid, recent `X-Weft-Signature` and no key; unsigned ones need a key with the `trigger` scope.
    An unknown path answers as a bad signature does (401)."""
    ctx = request.app.state.ctx
    await asyncio.to_thread(ctx.catalog.refresh)  # at most every 0.1 s: a new version may have changed the secret
    routes = ctx.catalog.webhooks(path)
    if not routes:
        await asyncio.to_thread(ctx.catalog.refresh, force=True)
        routes = ctx.catalog.webhooks(path)
    if not routes:
        status, code, message = _NOT_ACCEPTED
        raise ApiError(status, message, code=code)
    body = await request.body()
    sig = signature(request.headers)
    allowed, why = [], []
    used: str | None = None  # the signature that let it in, remembered against its delivery id
    key = None
    for route in routes:
        spec = route.spec.webhook
        assert spec is not None
        try:
            secret = secret_for(spec.secret_env)
        except KeyError:
            log.error("webhook %s of %s: its secret %s is not set: set it in the environment of `weft up` "
                      "(or `weft gateway`) and start it again",
                      spec.path, route.label, spec.secret_env)
            why.append((503, "unavailable", _unset_secret(spec.secret_env, ctx.auth.enabled)))
            continue
        if secret is not None:
            try:
                matched = verify(secret, body, sig, now=time.time(), tolerance=ctx.webhook_tolerance)
            except WebhookError as exc:  # signed with the secret, but too long ago (or ahead)
                why.append((exc.status, exc.code, str(exc)))
                continue
            if matched is None:
                why.append(_NOT_ACCEPTED)
                continue
            allowed.append(route)
            used = matched
            continue
        if key is None:
            key = await ctx.auth.identify(request)
        if key is None:
            why.append(_NOT_ACCEPTED)
        elif not key.allows("trigger") or not key.can_use(route.version.name):
            why.append((403, "forbidden", "this key may not trigger this webhook"))
        else:
            allowed.append(route)
    if not allowed:
        status, code, message = sorted(why)[0]
        raise ApiError(status, message, code=code)
    try:
        event_id, given = delivery_id(request.headers)
        if used is not None and not given:
            # No delivery id: the signature stands for the delivery, so a re-send is its duplicate.
            event_id = f"sig-{used[:32]}"
        event = webhook_event(path, body, request.headers.get("content-type"), event_id)
    except WebhookError as exc:
        raise ApiError(exc.status, str(exc), problems=[{"field": exc.field or "body", "message": str(exc)}]) from None
    if len(body) > ctx.executions.claims.limits.inline:  # measured here too: over the maximum is 413, not a dead letter
        await asyncio.to_thread(ctx.executions.claims.check, event.data, "body")
    if used is not None:
        other = await asyncio.to_thread(claim_signature, ctx.store, path, used, event_id, datetime.now(timezone.utc))
        if other is not None:
            raise ApiError(409, "this signature was already used for another delivery: sign each delivery anew "
                                "(a new timestamp) and keep X-Weft-Delivery the same on retries", code="conflict")
    [outcome] = await asyncio.to_thread(ctx.ingestor.ingest, [Trigger(event, via="webhook", routes=allowed)])
    if outcome.rejected:
        await dead_letter_rejected(ctx.transport, outcome, encode(event), source_subject=f"webhook:{event.subject}")
    if outcome.rejected and not outcome.executions:
        problems = [{"field": "body", "message": f"{label}: {reason}"} for label, reason in outcome.rejected.items()]
        raise ApiError(422, "; ".join(p["message"] for p in problems), problems=problems)
    return {"id": event.id, "source": event.source, "duplicate": outcome.status == "duplicate", "deduplicated": given,
            "executions": outcome.executions, "rejected": outcome.rejected}


# ---- keys ----------------------------------------------------------------------------------------


def _unbound(request: Request) -> None:
    if caller(request).workflows is not None:
        raise ApiError(403, "a key bound to workflows cannot manage keys")


@router.get("/keys", response_model=KeyList, responses=errors(), tags=["keys"], openapi_extra=scoped("admin"))
def list_keys(request: Request) -> Any:
    """Every key: prefix, scopes, binding, whether revoked. Never the key itself."""
    _unbound(request)
    return {"items": [k.public() for k in request.app.state.ctx.keys.list()]}


@router.post("/keys", status_code=201, response_model=KeyOut, responses=errors(), tags=["keys"],
             openapi_extra=scoped("admin"))
def create_key(request: Request, body: KeyCreate) -> Any:
    """Create a key. The answer is the only time the key itself is shown."""
    _unbound(request)
    try:
        token, key = request.app.state.ctx.keys.create(body.scopes, workflows=body.workflows, events=body.events,
                                                       name=body.name,
                                                       by=who(caller(request)))
    except KeyProblem as exc:
        field = str(exc).split(":")[0]
        raise ApiError(422, str(exc), problems=[{"field": f"body.{field}", "message": str(exc)}]) from None
    return key.public() | {"key": token}


@router.delete("/keys/{key_id}", response_model=KeyOut, responses=errors(404), tags=["keys"],
               openapi_extra=scoped("admin"))
def revoke_key(request: Request, key_id: str = Path(max_length=64, description="the key's id (its prefix)")) -> Any:
    """Revoke a key (recorded as an event); it stops working within seconds everywhere."""
    _unbound(request)
    try:
        key = request.app.state.ctx.keys.revoke(key_id, by=who(caller(request)))
    except KeyProblem as exc:
        raise ApiError(404, str(exc)) from None
    return key.public()
