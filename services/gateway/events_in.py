"""CloudEvents over HTTP for `POST /v1/triggers`: which content
mode a request is in, decoding it (contracts.cloudevents), who may publish what, and a batch
published event by event with an answer per event.

A batch is checked whole before anything is published: a body that is not a batch, or holds
more than `max_batch` events, is refused with nothing published; then every event is decoded,
authorised and measured, and only the events that passed are published. An event refused
does not stop the others. Each accepted event is published under its (source, id) message
id, so a client retrying a batch (say, after a 503) publishes nothing twice and starts
nothing twice: the broker and the trigger log both know the event. An event the broker did not
take (unreachable past the transport's retries) is a 503 in its item, never a 500 for the batch
while the others are stored: 207 says which went through; 503 whole when none did.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse

from contracts.cloudevents import (
    BATCH,
    STRUCTURED,
    BindingError,
    BindingLimits,
    from_batch,
    from_dict,
    from_http,
    load_json,
)
from contracts.payloads import MIB, PayloadError, PayloadTooLarge
from contracts.subjects import trigger_subject
from contracts.triggers import CloudEvent
from services.broker import BrokerError, MessageRejected
from services.gateway.errors import ApiError
from services.store import StoreUnavailableError
from services.gateway.keys import ApiKey
from services.gateway.models import TriggerIn
from services.triggers.publish import publish

if TYPE_CHECKING:
    from services.gateway.app import Context

PUBLISH_CONCURRENCY = 64  # publishes of one batch in flight at once (each waits for the broker's ack)

# Structured mode follows the spec: the four required attributes are required (the shorthand's are not).
_EVENT_SCHEMA = {**CloudEvent.model_json_schema(), "required": ["specversion", "id", "source", "type"]}
REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "A CloudEvent in any HTTP content mode. Binary mode: the attributes in `ce-id`, `ce-source`, "
                   "`ce-type`, `ce-specversion` (and `ce-subject`, `ce-time`, extensions) headers, percent-encoded "
                   "UTF-8; the data is the body, its media type the Content-Type.",
    "content": {
        "application/json": {"schema": TriggerIn.model_json_schema()},
        STRUCTURED: {"schema": _EVENT_SCHEMA},
        BATCH: {"schema": {"type": "array", "items": _EVENT_SCHEMA, "minItems": 1, "maxItems": 1000}},
    },
}


def limits_of(ctx: Context) -> BindingLimits:
    """The gateway's body limit for payload requests (errors.BodyLimit) bounds a body here too."""
    most = ctx.executions.claims.limits.maximum
    return BindingLimits(max_bytes=most + max(MIB, most // 4))


def refusal(exc: BindingError) -> ApiError:
    status = 415 if exc.field == "headers.content-type" else 422
    return ApiError(status, str(exc), problems=[{"field": f, "message": m} for f, m in exc.problems])


def decode_one(mode: str, headers: list[tuple[bytes, bytes]], body: bytes, limits: BindingLimits) -> CloudEvent:
    """Structured or binary mode (contracts.cloudevents), or Weft's JSON shorthand: a JSON object
    in which `id`, `source` and `specversion` may be left out (a fresh id, `weft:api`, `1.0`)."""
    if mode != "json":
        return from_http(headers, body, limits=limits)
    media = next((v.decode("latin-1").split(";")[0].strip().lower() for k, v in headers if k.lower() == b"content-type"),
                 "")
    if media and media != "application/json" and not media.endswith("+json"):
        raise BindingError("body", f"send JSON with Content-Type: application/json (not {media}), or a CloudEvent "
                                   f"in binary mode (ce-* headers) or structured mode ({STRUCTURED})")
    raw = load_json(body, "body", limits=limits)
    if isinstance(raw, dict):
        defaults = {"id": str(uuid.uuid4()), "source": "weft:api", "time": datetime.now(timezone.utc).isoformat()}
        # null or absent takes the default ("" stays, and is refused); specversion only absent, as TriggerIn says
        raw = {"specversion": "1.0", **raw, **{k: v for k, v in defaults.items() if raw.get(k) is None}}
    return from_dict(raw, "body", limits=limits)


async def forbidden(ctx: Context, key: ApiKey, event_type: str) -> str | None:
    """Why this key may not publish events of this type, or None. A bound key must not start
    workflows outside its binding through a shared topic."""
    if key.workflows is None:
        return None
    await asyncio.to_thread(ctx.catalog.refresh)
    return _outside(ctx, key, event_type)


def _outside(ctx: Context, key: ApiKey, event_type: str) -> str | None:
    if key.workflows is None:
        return None
    names = {r.version.name for r in ctx.catalog.subscribers(event_type)}
    outside = sorted(names - key.workflows)
    if outside or not names:
        why = f"it would also start {outside}" if outside else "none of its workflows subscribes to it"
        return f"this key may not publish events of type {event_type!r}: {why}"
    return None


def accepted(event: CloudEvent, stored: bool) -> dict[str, Any]:
    return {"id": event.id, "source": event.source, "type": event.type, "topic": trigger_subject(event.type),
            "duplicate": not stored}


def _error(status: int, exc: Exception, field: str) -> dict[str, Any]:
    code = {403: "forbidden", 413: "too_large"}.get(status, "invalid")
    problems = exc.problems if isinstance(exc, BindingError) else [(getattr(exc, "what", field), str(exc))]
    return {"code": code, "message": str(exc), "problems": [{"field": f, "message": m} for f, m in problems]}


async def publish_batch(ctx: Context, key: ApiKey, body: bytes, limits: BindingLimits) -> Any:
    """202 when every event was accepted, 207 when some were not, 422 (the error model, each
    problem naming `body[i].<field>`) when none was, 503 when none was and some may be on a
    retry (the broker was unreachable); 413/422 for a body refused whole."""
    try:
        decoded = from_batch(body, "body", limits=limits)
    except BindingError as exc:
        raise refusal(exc) from None
    items: list[dict[str, Any]] = []
    ready: list[tuple[dict[str, Any], CloudEvent]] = []
    seen: dict[tuple[str, str], tuple[int, CloudEvent]] = {}
    claims = ctx.executions.claims
    if key.workflows is not None:
        await asyncio.to_thread(ctx.catalog.refresh)  # once for the batch, not once per event
    for i, got in enumerate(decoded):
        item: dict[str, Any] = {"index": i}
        items.append(item)
        if isinstance(got, BindingError):
            item.update(status=422, error=_error(422, got, f"body[{i}]"))
            continue
        item.update(id=got.id, source=got.source, type=got.type, topic=trigger_subject(got.type))
        why = _outside(ctx, key, got.type)
        if why:
            item.update(status=403, error=_error(403, ApiError(403, why), f"body[{i}].type"))
            continue
        if got.data is not None:
            try:  # measured before anything is published, so a refused event costs nothing
                claims.check(got.data, f"body[{i}].data")
            except PayloadTooLarge as exc:
                item.update(status=413, error=_error(413, exc, f"body[{i}].data"))
                continue
            except PayloadError as exc:
                item.update(status=422, error=_error(422, exc, f"body[{i}].data"))
                continue
        earlier = seen.get((got.source, got.id))
        if earlier is not None:  # one batch naming one event twice: publish it once
            first, same = earlier
            if same != got:  # the broker would keep the first and drop this one without a word
                message = (f"the same source and id as body[{first}] with other attributes or data: a CloudEvent's "
                           "source and id name one event")
                item.update(status=409, error={"code": "conflict", "message": message,
                                               "problems": [{"field": f"body[{i}].id", "message": message}]})
            else:
                item.update(status=202, duplicate=True)
            continue
        seen[(got.source, got.id)] = (i, got)
        ready.append((item, got))
    gate = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def one(item: dict[str, Any], event: CloudEvent) -> None:
        async with gate:
            try:
                stored = await publish(ctx.transport, event, claims)
            except MessageRejected as exc:  # this one message can never be stored
                item.update(status=413, error=_error(413, exc, f"body[{item['index']}]"))
                return
            except (BrokerError, StoreUnavailableError) as exc:
                # Said per event: the others may be stored already. Sending the whole batch again
                # is safe, each event is published under its (source, id) and starts nothing twice.
                field = f"body[{item['index']}]"
                message = f"not published, the broker or the store is unreachable ({exc}): send it again"
                item.update(status=503, error={"code": "unavailable", "message": message,
                                               "problems": [{"field": field, "message": message}]})
                return
        item.update(status=202, duplicate=not stored)

    await asyncio.gather(*(one(item, event) for item, event in ready))
    done = sum(1 for item in items if item["status"] == 202)
    answer = {"accepted": done, "rejected": len(items) - done, "items": items}
    if done == len(items):
        return answer
    if done == 0:
        problems = [p for item in items for p in item["error"]["problems"]]
        statuses = {item["status"] for item in items}
        # 503 if any event may go through when sent again: the client should retry, not give up
        status = 503 if 503 in statuses else statuses.pop() if len(statuses) == 1 else 422
        raise ApiError(status, f"none of the {len(items)} events was accepted: "
                       + "; ".join(f"{p['field']}: {p['message']}" for p in problems[:20]), problems=problems,
                       headers={"Retry-After": "1"} if status == 503 else None)
    return JSONResponse(answer, status_code=207)
