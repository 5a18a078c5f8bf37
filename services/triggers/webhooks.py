"""Webhooks: `on: [{webhook: {path: /orders, secret_env: ORDERS_SECRET}}]`.

A request to `POST /v1/webhooks/orders` becomes a CloudEvent
  type `weft.webhook`, source `weft:webhook/orders`, subject `/orders`,
  id = the delivery id (header `X-Weft-Delivery`, else `Idempotency-Key`),
  data = the JSON body (or the body as text for other content types),
and is ingested like any trigger, so a redelivered request starts nothing new.

When the definition names a secret, the request must be signed the way Stripe
and Slack sign theirs: a timestamp together with the body, so a captured
request cannot be replayed later:

    X-Weft-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

`v1` may appear more than once (while a secret is being rotated); one match is
enough, each compared in constant time. The timestamp must be within
`webhook_tolerance` seconds (default 300) of the gateway's clock. Inside that
window, a signature is good for one delivery: the gateway remembers it with
its delivery id (services/gateway/routes_triggers.py), so the same body and
signature re-sent under a new or missing delivery id are refused, and a retry
under the same delivery id is the duplicate it always was. A body-only
signature (`sha256=...`, GitHub's style) is no longer accepted: it never expires.
A secret named but not set in the gateway's environment fails closed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import orjson

from contracts import values
from contracts.triggers import CloudEvent
from services.triggers.routing import normalise_path

WEBHOOK_EVENT_TYPE = "weft.webhook"
SIGNATURE_HEADER = "x-weft-signature"
DELIVERY_HEADERS = ("x-weft-delivery", "idempotency-key")
DEFAULT_TOLERANCE = 300.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_SIGNATURES = 8


class WebhookError(ValueError):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.field = status, code, field


def sign(secret: str | bytes, body: bytes, timestamp: int) -> str:
    """The signature header value for a body sent at `timestamp` (unix seconds): `t=...,v1=...`."""
    return f"t={int(timestamp)},v1={_mac(secret, int(timestamp), body)}"


def _mac(secret: str | bytes, timestamp: int, body: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Signature:
    timestamp: int
    v1: tuple[str, ...]


def signature(headers: Mapping[str, str]) -> Signature | None:
    """The parsed X-Weft-Signature header; None when absent or not of the `t=...,v1=...` form."""
    raw = headers.get(SIGNATURE_HEADER)
    if not raw:
        return None
    timestamp: int | None = None
    v1: list[str] = []
    for part in raw.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit() and len(value) <= 12 and timestamp is None:
            timestamp = int(value)
        elif name == "v1" and _HEX64.match(value) and len(v1) < _MAX_SIGNATURES:
            v1.append(value)
    if timestamp is None or not v1:
        return None
    return Signature(timestamp, tuple(v1))


def verify(secret: str | bytes, body: bytes, sig: Signature | None, *, now: float,
           tolerance: float = DEFAULT_TOLERANCE) -> str | None:
    """The v1 that matches (the signature to remember), or None: no match, or out of the window.

    The HMAC is checked first and the time second, so "expired" is said only to whoever holds
    a signature the secret made."""
    if sig is None:
        return None
    expected = _mac(secret, sig.timestamp, body).encode()
    matched = None
    for candidate in sig.v1:  # every candidate is compared: the time does not tell which one matched
        if hmac.compare_digest(expected, candidate.encode()):
            matched = candidate
    if matched is None:
        return None
    if abs(now - sig.timestamp) > tolerance:
        raise WebhookError(401, "unauthorized", f"the signature's timestamp is more than {tolerance:g}s away from "
                           "the gateway's clock: sign each delivery when you send it", field="header.x-weft-signature")
    return matched


def secret_for(secret_env: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The secret a definition names, or None when it names none. KeyError: named but not set."""
    if not secret_env:
        return None
    env = os.environ if environ is None else environ
    value = env.get(secret_env)
    if not value and env.get(f"{secret_env}_FILE"):
        # Docker's convention for secrets mounted as files (compose `secrets:`, /run/secrets/NAME).
        value = _read_secret_file(Path(env[f"{secret_env}_FILE"]))
    if not value:
        raise KeyError(secret_env)
    return value


SECRET_FILE_MAX = 64 * 1024


def _read_secret_file(path: Path) -> str | None:
    """A secret mounted as a file: None (not configured, logged as such by the caller) when it is
    missing, larger than SECRET_FILE_MAX or not UTF-8, never an exception on a request's path."""
    try:
        with open(path, "rb") as f:
            raw = f.read(SECRET_FILE_MAX + 1)
    except OSError:
        return None
    if len(raw) > SECRET_FILE_MAX:
        return None
    try:
        return raw.decode().strip() or None
    except UnicodeDecodeError:
        return None


def delivery_id(headers: Mapping[str, str]) -> tuple[str, bool]:
    """(id, given): the sender's delivery id, or a fresh one (then retries are not deduplicated)."""
    for name in DELIVERY_HEADERS:
        value = headers.get(name)
        if value and value.strip():
            value = value.strip()
            if len(value) > 256:
                raise WebhookError(422, "invalid", f"header {name}: at most 256 characters", field=f"header.{name}")
            return value, True
    return str(uuid.uuid4()), False


def webhook_event(path: str, body: bytes, content_type: str | None, event_id: str) -> CloudEvent:
    """The CloudEvent a webhook request stands for."""
    path = normalise_path(path)
    media = (content_type or "application/json").split(";")[0].strip().lower()
    data: Any
    if media == "application/json" or media.endswith("+json"):
        if body.strip():
            try:  # the gateway's limits (depth, 64-bit integers, no lone surrogates), not orjson's
                data = values.loads(body, "body")
            except values.ValueProblem as exc:
                raise WebhookError(422, "invalid", str(exc), field=exc.path) from None
        else:
            data = None
        media = "application/json"
    else:
        try:
            data = body.decode("utf-8")
        except UnicodeDecodeError:
            raise WebhookError(422, "invalid", "body: not UTF-8 text", field="body") from None
    return CloudEvent(id=event_id, source=f"weft:webhook{path}", type=WEBHOOK_EVENT_TYPE, subject=path,
                      time=datetime.now(timezone.utc), datacontenttype=media, data=data)


# ---- one delivery per signature -------------------------------------------------------------

_NS = uuid.UUID("5d0f6a3e-2f4b-4c47-9a51-7c0e8b1d2a64")
SIGNATURE_USED = "WebhookSignatureUsed"


def claim_signature(store: Any, path: str, v1: str, delivery: str, at: datetime) -> str | None:
    """Record that signature `v1` on `path` is `delivery`'s. None when it is (now or already);
    else the other delivery id it was used for: a replay under a new id.

    Kept in the event store, as API keys are (one short stream per signature), so every
    gateway replica sees it, and a crash between this and the ingest is healed by the
    sender's retry under the same delivery id."""
    from services.store import ConcurrencyError, NewEvent

    stream = uuid.uuid5(_NS, f"{normalise_path(path)}:{v1}")
    data = orjson.dumps({"type": SIGNATURE_USED, "schema_version": 1, "path": normalise_path(path),
                         "delivery": delivery, "at": at.isoformat()})
    try:
        store.append([NewEvent(stream, 1, SIGNATURE_USED, data)])
        return None
    except ConcurrencyError:
        [first, *_] = store.load(stream)
        used = orjson.loads(first.data)["delivery"]
        return None if used == delivery else used
