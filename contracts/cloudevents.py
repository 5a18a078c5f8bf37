"""CloudEvents protocol bindings, inbound: every way a producer may send an event, decoded to
the trigger-event contract (`contracts.triggers.CloudEvent`) or refused with one `BindingError`.

Pure: bytes and headers in, a model or an error out; no I/O, no clock, no random ids.

    HTTP   structured  Content-Type: application/cloudevents+json, the event is the body
           binary      attributes in `ce-<name>` headers (percent-encoded UTF-8),
                       Content-Type -> datacontenttype, the body is the data (what Knative
                       and the SDKs' `to_binary` send)
           batch       Content-Type: application/cloudevents-batch+json, a JSON array of
                       structured events; each item is decoded on its own
    NATS   structured  the event is the message body (what `weft publish` sends)
           binary      `ce-<name>` headers, `content-type` -> datacontenttype, body is data
    Kafka  structured  header content-type: application/cloudevents+json, value is the event
           binary      `ce_<name>` headers (UTF-8 bytes), `content-type`, value is the data

Why not the official SDK's bindings (`cloudevents.core.bindings.http` / `.kafka`, 2.x): the
header mapping is the small part, and the SDK would have to become a runtime dependency
while leaving the rest to do here. Its decoders parse with plain `json.loads` (no depth or
size budget; a body that is not JSON silently becomes a string), accept any `time` dateutil
can guess, and have no batch mode. The SDK is what the tests use as the producer.

Limits (BindingLimits), checked before and while parsing, on every path: message size,
JSON depth and values Weft cannot carry (contracts.values), batch length, number and size
of `ce-` attributes, UTF-8 everywhere (bodies and header values, after percent-decoding).
Every refusal names the field (`body.data[0]`, `headers.ce-id`, `body[3].source`) and,
where there is one, the limit.

Event data is JSON in Weft (it becomes an execution's input): a JSON media type is parsed,
any other is kept as text when it is UTF-8; binary data (non-UTF-8, or `data_base64`) is
refused with the reason rather than carried half-understood.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from pydantic import ValidationError

from contracts import values
from contracts.triggers import CloudEvent

KIB = 1024
MIB = 1024 * KIB

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
SPECVERSION = "1.0"
REQUIRED = ("id", "source", "specversion", "type")
# CloudEvents 1.0: lower-case letters and digits; it asks for at most 20 (SHOULD), producers use more
_NAME = re.compile(r"^[a-z0-9]{1,64}$")
_JSON_MEDIA = re.compile(r"^(application|text)/([a-z0-9.!#$&^_-]+\+)?json$")
# Attributes that are not `ce-` headers in binary mode: data is the body, its type is Content-Type.
_NOT_HEADERS = {"data": "in binary mode the data is the body", "data_base64": "in binary mode the data is the body"}


class BindingError(ValueError):
    """An event that cannot be accepted: `field` names where (`body.id`, `headers.ce-type`,
    `body[2].data`), `message` what is wrong and, where there is one, the limit. `problems`
    lists every (field, message) found, the first being `field`'s."""

    non_retryable = True

    def __init__(self, field: str, message: str, *, problems: list[tuple[str, str]] | None = None):
        self.field, self.message = field, message
        self.problems = problems or [(field, message)]
        super().__init__("; ".join(f"{f}: {m}" for f, m in self.problems))


@dataclass(frozen=True, slots=True)
class BindingLimits:
    """What one message may hold. `max_bytes` bounds a body (or a Kafka value) before it is
    parsed; the event's data is measured again by the payload policy after decoding."""

    max_bytes: int = 65 * MIB  # the default payload maximum (64 MiB) and room for the envelope
    max_depth: int = values.MAX_DEPTH
    max_batch: int = 1000  # events in one batch request
    max_attributes: int = 64  # `ce-` headers in one message
    max_attribute_bytes: int = 4 * KIB  # one header value, percent-encoded


LIMITS = BindingLimits()


def media_type(content_type: str | bytes | None) -> str:
    """`Application/JSON; charset=utf-8` -> `application/json` ('' when absent)."""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return (content_type or "").split(";")[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    return bool(_JSON_MEDIA.match(media_type(content_type)))


# ---- the one validation every path ends in --------------------------------------------------


def _at(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def from_dict(raw: Any, where: str = "", *, limits: BindingLimits = LIMITS, header: str | None = None) -> CloudEvent:
    """A structured event already parsed from JSON (or attributes gathered from headers) to the
    contract model. `where` prefixes field names; `header` (`ce-` or `ce_`) names attributes as
    the headers they came in, for binary mode."""

    def field(name: str) -> str:
        return f"headers.{header}{name}" if header and name != "data" else _at(where, name)

    if not isinstance(raw, dict):
        raise BindingError(where or "event", f"a CloudEvent must be a JSON object, not {_kind(raw)}")
    try:  # binary mode: the data was checked as the body it came in (load_json), the headers as text
        values.check_value({k: v for k, v in raw.items() if k != "data"} if header else raw, where,
                           max_depth=limits.max_depth)
    except values.ValueProblem as exc:
        raise BindingError(exc.path, exc.message) from None
    missing = [(field(a), "Field required")
               for a in REQUIRED if raw.get(a) is None]
    if missing:
        raise BindingError(missing[0][0], missing[0][1], problems=missing)
    if raw["specversion"] != SPECVERSION:
        raise BindingError(field("specversion"), f"must be {SPECVERSION!r} (CloudEvents 1.0), not {raw['specversion']!r}")
    if "time" in raw and raw["time"] is not None and not isinstance(raw["time"], str):
        raise BindingError(field("time"), "must be an RFC 3339 time string")
    if "data_base64" in raw:
        raise BindingError(field("data_base64"), "binary data is not accepted: Weft's event data is JSON or text "
                                                 "(send it in `data`)")
    extensions = [k for k in raw if k not in CloudEvent.model_fields]
    if len(extensions) > limits.max_attributes:
        raise BindingError(where or "event", f"{len(extensions)} extension attributes, over the limit of "
                                             f"{limits.max_attributes}")
    try:
        return CloudEvent.model_validate(raw)
    except ValidationError as exc:
        problems = [(field(".".join(str(p) for p in e["loc"])) if e["loc"] else where or "event", e["msg"])
                    for e in exc.errors()]
        raise BindingError(problems[0][0], problems[0][1], problems=problems) from None


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(type(value), "a number")


# ---- bodies --------------------------------------------------------------------------------


def _sized(body: bytes | None, where: str, limits: BindingLimits) -> bytes:
    body = body or b""
    if len(body) > limits.max_bytes:
        raise BindingError(where, f"{len(body)} bytes, over the limit of {limits.max_bytes} bytes")
    return body


def load_json(body: bytes | None, where: str = "body", *, limits: BindingLimits = LIMITS) -> Any:
    """JSON text to a value within the limits: size first, then UTF-8, then the parser (whose
    own recursion limit is caught), then depth and values Weft cannot carry."""
    body = _sized(body, where, limits)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BindingError(where, f"not UTF-8 text (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise BindingError(where, "empty: expected JSON")
    try:
        value = values.loads(text, where)
        values.check_value(value, where, max_depth=limits.max_depth)
    except values.ValueProblem as exc:
        raise BindingError(exc.path, exc.message) from None
    return value


def from_structured(body: bytes | None, where: str = "body", *, limits: BindingLimits = LIMITS) -> CloudEvent:
    """Structured mode (any binding): the body is one event in the JSON event format."""
    return from_dict(load_json(body, where, limits=limits), where, limits=limits)


def from_batch(body: bytes | None, where: str = "body", *,
               limits: BindingLimits = LIMITS) -> list[CloudEvent | BindingError]:
    """Batch mode: the body is a JSON array of structured events. A body that is not one, or
    holds more than `max_batch` events, is refused whole (BindingError); otherwise each item is
    an event or the BindingError that item alone gets, in order."""
    items = load_json(body, where, limits=limits)
    if not isinstance(items, list):
        raise BindingError(where, f"a batch must be a JSON array of CloudEvents, not {_kind(items)}")
    if len(items) > limits.max_batch:
        raise BindingError(where, f"{len(items)} events, over the limit of {limits.max_batch} in one batch")
    if not items:
        raise BindingError(where, "an empty batch: send at least one CloudEvent")
    out: list[CloudEvent | BindingError] = []
    for i, item in enumerate(items):
        try:
            out.append(from_dict(item, f"{where}[{i}]", limits=limits))
        except BindingError as exc:
            out.append(exc)
    return out


# ---- headers -------------------------------------------------------------------------------


def _text(value: str | bytes, field: str, limits: BindingLimits) -> str:
    """A header value: percent-decoded, then strict UTF-8 (a lone surrogate is not UTF-8)."""
    try:
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
    except UnicodeEncodeError:
        raise BindingError(field, "not UTF-8 text (it holds a lone UTF-16 surrogate)") from None
    if len(raw) > limits.max_attribute_bytes:
        raise BindingError(field, f"{len(raw)} bytes, over the limit of {limits.max_attribute_bytes} bytes "
                                  "for one attribute")
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BindingError(field, f"not UTF-8 text after percent-decoding (invalid byte at offset {exc.start})") from None


def _name(name: str | bytes) -> str:
    return (name.decode("latin-1") if isinstance(name, bytes) else name).lower()


def has_prefix(headers: Iterable[tuple[str | bytes, Any]], prefix: str) -> bool:
    return any(_name(k).startswith(prefix) for k, _ in headers)


def _pairs(headers: Mapping[str, Any] | Iterable[tuple[Any, Any]] | None) -> list[tuple[str | bytes, Any]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def from_binary(headers: Iterable[tuple[str | bytes, str | bytes | None]], body: bytes | None, *, prefix: str = "ce-",
                where: str = "body", limits: BindingLimits = LIMITS) -> CloudEvent:
    """Binary mode (any binding): attributes in `<prefix><name>` headers, `content-type` the
    datacontenttype, the body the data. `prefix` is `ce-` for HTTP and NATS, `ce_` for Kafka."""
    body = _sized(body, where, limits)
    attrs: dict[str, Any] = {}
    content_type: str | None = None
    count = 0
    for key, value in headers:
        name = _name(key)
        if name == "content-type":
            if value is not None:
                content_type = _text(value, "headers.content-type", limits)
            continue
        if not name.startswith(prefix):
            continue
        count += 1
        if count > limits.max_attributes:
            raise BindingError("headers", f"more than {limits.max_attributes} {prefix}* attribute headers")
        attr = name[len(prefix):]
        field = f"headers.{name}"
        if attr in _NOT_HEADERS:
            raise BindingError(field, _NOT_HEADERS[attr])
        if not _NAME.match(attr):
            raise BindingError(field, "not a CloudEvents attribute name (lower-case letters and digits, 1 to 64)")
        text = _text(value if value is not None else b"", field, limits)
        if attr in attrs and attrs[attr] != text:
            raise BindingError(field, "given twice, with different values")
        attrs[attr] = text
    if content_type is None and "datacontenttype" in attrs:
        content_type = attrs["datacontenttype"]
    content_type = content_type or "application/json"  # what the SDKs assume when it is absent
    attrs["datacontenttype"] = content_type
    attrs["data"] = _data(body, content_type, where, limits)
    return from_dict(attrs, "", limits=limits, header=prefix)


def _data(body: bytes, content_type: str, where: str, limits: BindingLimits) -> Any:
    if not body:
        return None
    if is_json(content_type):
        return load_json(body, where, limits=limits)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BindingError(where, f"binary data ({media_type(content_type)}) is not accepted: Weft's event data is "
                                  "JSON or UTF-8 text") from None
    try:
        values.check_value(text, where)
    except values.ValueProblem as exc:
        raise BindingError(exc.path, exc.message) from None
    return text


# ---- the bindings --------------------------------------------------------------------------


def http_mode(headers: Mapping[str, Any] | Iterable[tuple[Any, Any]]) -> str:
    """`batch`, `structured` or `binary`, from the request's headers (the HTTP binding's rules:
    the CloudEvents media types name the first two; `ce-` headers the third). `json` is neither:
    a plain JSON body without `ce-` headers (Weft's own shorthand, see the gateway)."""
    pairs = _pairs(headers)
    media = next((media_type(v) for k, v in pairs if _name(k) == "content-type"), "")
    if media == BATCH:
        return "batch"
    if media.startswith("application/cloudevents"):
        return "structured"
    if has_prefix(pairs, "ce-"):
        return "binary"
    return "json"


def from_http(headers: Mapping[str, Any] | Iterable[tuple[Any, Any]], body: bytes | None, *,
              limits: BindingLimits = LIMITS) -> CloudEvent:
    """One event from an HTTP request in structured or binary mode (batch: `from_batch`)."""
    pairs = _pairs(headers)
    mode = http_mode(pairs)
    if mode == "batch":
        raise BindingError("headers.content-type", f"{BATCH} holds many events: decode it with from_batch")
    if mode == "structured":
        media = next(media_type(v) for k, v in pairs if _name(k) == "content-type")
        if media != STRUCTURED:
            raise BindingError("headers.content-type", f"{media}: the only event format accepted is JSON ({STRUCTURED})")
        return from_structured(body, "body", limits=limits)
    if mode == "binary":
        return from_binary(pairs, body, prefix="ce-", limits=limits)
    return from_structured(body, "body", limits=limits)


def from_nats(headers: Mapping[str, str] | None, data: bytes | None, *, limits: BindingLimits = LIMITS) -> CloudEvent:
    """A NATS message (the CloudEvents NATS binding): binary when it has `ce-` headers,
    structured otherwise. Field names: `headers.ce-id` (binary), `body.id`, `body.data.order`."""
    pairs = _pairs(headers)
    if has_prefix(pairs, "ce-"):
        for name, value in pairs:
            # nats-py decodes header values with errors="replace": bytes that were not UTF-8 arrive
            # as U+FFFD, which would otherwise pass as (a different) text. Nobody sends it on purpose.
            if _name(name).startswith("ce-") and isinstance(value, str) and "\ufffd" in value:
                raise BindingError(f"headers.{_name(name)}", "not UTF-8 text (bytes that are not UTF-8 reach us "
                                                               "as U+FFFD; percent-encode them)")
        return from_binary(pairs, data, prefix="ce-", limits=limits)
    return from_structured(data, "body", limits=limits)


def from_kafka(headers: Iterable[tuple[str, bytes | None]] | None, key: bytes | str | None, value: bytes | None, *,
               limits: BindingLimits = LIMITS) -> CloudEvent:
    """A Kafka record (the CloudEvents Kafka binding), for the Kafka triggers consumer.

    headers: the record's headers as aiokafka gives them, `[(name, value bytes), ...]`
    key:     the record key, or None. A UTF-8 key becomes the `partitionkey` extension
             unless the event names one itself; any other key is not mapped.
    value:   the record value (None for a tombstone).

    Structured mode when the `content-type` header is `application/cloudevents+json`
    (the value is the event); binary mode otherwise (`ce_<name>` headers, `content-type`
    the datacontenttype, the value the data). Raises BindingError naming the field
    (`headers.ce_id`, `value.data`, `value`) and the limit."""
    pairs = _pairs(headers)
    media = next((media_type(v) for k, v in pairs if _name(k) == "content-type" and v is not None), "")
    if media.startswith("application/cloudevents"):
        if media != STRUCTURED:
            raise BindingError("headers.content-type", f"{media}: the only event format accepted is JSON ({STRUCTURED})")
        event = from_structured(value, "value", limits=limits)
    elif has_prefix(pairs, "ce_"):
        event = from_binary(pairs, value, prefix="ce_", where="value", limits=limits)
    else:
        raise BindingError("headers", "not a CloudEvent: no ce_* headers (binary mode) and no content-type: "
                                      f"{STRUCTURED} (structured mode)")
    if key is not None and "partitionkey" not in (event.model_extra or {}):
        try:
            text = key.decode("utf-8") if isinstance(key, bytes) else key
        except UnicodeDecodeError:
            return event
        if text and len(text.encode()) <= limits.max_attribute_bytes and text.isprintable():
            return CloudEvent.model_validate({**event.model_dump(), "partitionkey": text})
    return event
