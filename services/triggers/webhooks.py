"""Webhooks: `on: [{webhook: {path: /orders, secret_env: ORDERS_SECRET}}]`.

A request to `POST /v1/webhooks/orders` becomes a CloudEvent
  type `weft.webhook`, source `weft:webhook/orders`, subject `/orders`,
  id = the delivery id (header `X-Weft-Delivery`, else `Idempotency-Key`),
  data = the JSON body (or the body as text for other content types),
and is ingested like any trigger, so a redelivered request starts nothing new.

When the definition names a secret, the request must carry
`X-Weft-Signature: sha256=<hex HMAC-SHA256 of the raw body>` (GitHub's
`X-Hub-Signature-256` is accepted too), compared in constant time. A secret
named but not set in the gateway's environment fails closed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from datetime import datetime, timezone
from typing import Any, Mapping

from contracts import values
from contracts.triggers import CloudEvent
from services.triggers.routing import normalise_path

WEBHOOK_EVENT_TYPE = "weft.webhook"
SIGNATURE_HEADERS = ("x-weft-signature", "x-hub-signature-256")
DELIVERY_HEADERS = ("x-weft-delivery", "idempotency-key")


class WebhookError(ValueError):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.field = status, code, field


def sign(secret: str | bytes, body: bytes) -> str:
    """The signature header value for a body: `sha256=<hex>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def signature(headers: Mapping[str, str]) -> str | None:
    for name in SIGNATURE_HEADERS:
        value = headers.get(name)
        if value:
            return value.strip()
    return None


def verify(secret: str | bytes, body: bytes, header: str | None) -> bool:
    if not header:
        return False
    # compare_digest over equal-length ASCII strings: time does not depend on where they differ.
    return hmac.compare_digest(sign(secret, body).encode(), header.encode("ascii", "replace"))


def secret_for(secret_env: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The secret a definition names, or None when it names none. KeyError: named but not set."""
    if not secret_env:
        return None
    value = (os.environ if environ is None else environ).get(secret_env)
    if not value:
        raise KeyError(secret_env)
    return value


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
