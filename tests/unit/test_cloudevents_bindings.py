"""contracts.cloudevents: every binding decoded to the trigger contract, with the official SDK
(cloudevents 2.x) as the producer, and hostile input refused naming the field and the limit."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import http as sdk_http
from cloudevents.core.bindings import kafka as sdk_kafka
from cloudevents.core.v1.event import CloudEvent as SdkEvent

from contracts.cloudevents import (
    BATCH,
    LIMITS,
    STRUCTURED,
    BindingError,
    BindingLimits,
    from_batch,
    from_binary,
    from_http,
    from_kafka,
    from_nats,
    from_structured,
    http_mode,
)

T = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


def sdk_event(data: dict[str, Any] | str | None = None, **attrs: object) -> SdkEvent:
    base: dict[str, object] = {"type": "order.created", "source": "https://shop.example/orders", "id": "o-1",
                               "time": T, "subject": "orders/1"}
    return SdkEvent({**base, **attrs}, data if data is not None else {"order_id": 7})


def refused(call: object, *args: object, **kw: object) -> BindingError:
    with pytest.raises(BindingError) as info:
        call(*args, **kw)  # type: ignore[operator]
    return info.value


# ---- HTTP ---------------------------------------------------------------------------------


def test_http_structured_from_the_sdk() -> None:
    msg = sdk_http.to_structured_event(sdk_event(tenant="acme"))
    assert http_mode(msg.headers) == "structured"
    event = from_http(msg.headers, msg.body)
    assert (event.id, event.source, event.type, event.subject) == ("o-1", "https://shop.example/orders",
                                                                   "order.created", "orders/1")
    assert event.time == T and event.data == {"order_id": 7} and event.model_extra == {"tenant": "acme"}


def test_http_binary_from_the_sdk_maps_headers_content_type_and_body() -> None:
    msg = sdk_http.to_binary_event(sdk_event(source="https://shop.example/é 100%", tenant="acme",
                                             datacontenttype="application/json"))
    assert http_mode(msg.headers) == "binary" and "ce-id" in msg.headers
    event = from_http(msg.headers, msg.body)
    assert event.source == "https://shop.example/é 100%"  # percent-decoded UTF-8
    assert event.datacontenttype == "application/json" and event.data == {"order_id": 7}
    assert event.time == T and event.model_extra == {"tenant": "acme"}


def test_http_binary_takes_raw_header_bytes_and_text_data() -> None:
    headers = [(b"ce-id", b"1"), (b"ce-source", b"s"), (b"ce-type", b"note.added"), (b"ce-specversion", b"1.0"),
               (b"content-type", b"text/plain; charset=utf-8"), (b"user-agent", b"x")]
    event = from_http(headers, "grüße".encode())
    assert event.data == "grüße" and event.datacontenttype == "text/plain; charset=utf-8"
    empty = from_http(headers, b"")
    assert empty.data is None


def test_http_batch_decodes_each_item_on_its_own() -> None:
    good = orjson.loads(sdk_http.to_structured_event(sdk_event()).body)
    body = orjson.dumps([good, {**good, "id": "o-2"}, {"type": "x"}, {**good, "specversion": "0.3"}, 5])
    assert http_mode({"Content-Type": BATCH}) == "batch"
    out = from_batch(body)
    assert [e.id for e in out[:2] if not isinstance(e, BindingError)] == ["o-1", "o-2"]
    missing = out[2]
    assert isinstance(missing, BindingError) and missing.field == "body[2].id"
    assert {f for f, _ in missing.problems} == {"body[2].id", "body[2].source", "body[2].specversion"}
    assert isinstance(out[3], BindingError) and out[3].field == "body[3].specversion" and "'1.0'" in out[3].message
    assert isinstance(out[4], BindingError) and out[4].field == "body[4]" and "JSON object" in out[4].message


def test_a_batch_over_the_item_limit_or_not_an_array_is_refused_whole() -> None:
    one = {"specversion": "1.0", "id": "x", "source": "s", "type": "t"}
    exc = refused(from_batch, orjson.dumps([one] * 1001))
    assert exc.field == "body" and "1001 events, over the limit of 1000" in str(exc)
    assert len(from_batch(orjson.dumps([one] * 3), limits=BindingLimits(max_batch=3))) == 3
    assert "JSON array" in str(refused(from_batch, b'{"a": 1}'))
    assert "empty batch" in str(refused(from_batch, b"[]"))


def test_other_event_formats_are_refused_naming_the_content_type() -> None:
    exc = refused(from_http, {"Content-Type": "application/cloudevents+avro"}, b"x")
    assert exc.field == "headers.content-type" and STRUCTURED in exc.message


# ---- required attributes and specversion, on every path ----------------------------------


@pytest.mark.parametrize("attr", ["id", "source", "type", "specversion"])
def test_a_missing_required_attribute_is_named(attr: str) -> None:
    full = {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": {}}
    structured = {k: v for k, v in full.items() if k != attr}
    assert refused(from_structured, orjson.dumps(structured)).field == f"body.{attr}"
    assert refused(from_nats, None, orjson.dumps(structured)).field == f"body.{attr}"
    headers = {f"ce-{k}": v for k, v in full.items() if k not in (attr, "data")}
    assert refused(from_http, headers, b"{}").field == f"headers.ce-{attr}"
    kafka = [(f"ce_{k}", str(v).encode()) for k, v in full.items() if k not in (attr, "data")]
    assert refused(from_kafka, kafka, None, b"{}").field == f"headers.ce_{attr}"


@pytest.mark.parametrize("version", ["0.3", "2.0", 1.0])
def test_a_wrong_specversion_is_refused(version: str | float) -> None:
    event = {"specversion": version, "id": "1", "source": "s", "type": "t"}
    exc = refused(from_structured, orjson.dumps(event))
    assert exc.field == "body.specversion" and "must be '1.0'" in exc.message
    if isinstance(version, float):
        return  # a header is text: "1.0" is the right version there
    headers = {"ce-specversion": version, "ce-id": "1", "ce-source": "s", "ce-type": "t"}
    assert refused(from_http, headers, b"").field == "headers.ce-specversion"


def test_bad_attribute_values_name_the_field() -> None:
    base = {"specversion": "1.0", "id": "1", "source": "s", "type": "t"}
    assert refused(from_structured, orjson.dumps({**base, "type": "has spaces"})).field == "body.type"
    assert refused(from_structured, orjson.dumps({**base, "time": 1700000000})).field == "body.time"
    assert refused(from_structured, orjson.dumps({**base, "data_base64": "AAE="})).field == "body.data_base64"
    assert refused(from_structured, orjson.dumps({**base, "id": "x" * 300})).field == "body.id"
    assert refused(from_structured, b"[1]").message.startswith("a CloudEvent must be a JSON object")


# ---- hostile input -------------------------------------------------------------------------


def test_a_100_mb_message_is_refused_before_parsing_on_every_path() -> None:
    huge = b"[" + b"0," * (50 * 1024 * 1024) + b"0]"  # ~100 MB
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "t"}
    limit = f"over the limit of {LIMITS.max_bytes} bytes"
    for exc, field in [
        (refused(from_structured, huge), "body"),
        (refused(from_http, headers, huge), "body"),
        (refused(from_batch, huge), "body"),
        (refused(from_nats, None, huge), "body"),
        (refused(from_nats, headers, huge), "body"),
        (refused(from_kafka, [("content-type", STRUCTURED.encode())], None, huge), "value"),
        (refused(from_kafka, [(k.replace("-", "_"), v.encode()) for k, v in headers.items()], None, huge), "value"),
    ]:
        assert exc.field == field and limit in exc.message, exc


def test_10000_deep_data_is_refused_naming_the_depth_limit() -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "t",
               "content-type": "application/json"}
    binary = refused(from_http, headers, deep)
    assert binary.field == "body" and "nested deeper than 100 levels" in binary.message
    structured = b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":' + deep + b"}"
    assert "nested deeper than 100 levels" in str(refused(from_structured, structured))
    assert "nested deeper than 100 levels" in str(refused(from_batch, b"[" + structured + b"]"))
    shallow = b"[" * 150 + b"]" * 150  # past the limit but not the parser's: the field is named
    exc = refused(from_http, headers, shallow)
    assert exc.field.startswith("body[0][0]") and "nested deeper than 100 levels" in exc.message


@pytest.mark.parametrize("value", [b"caf\xe9", b"caf%E9", b"%C3%28", b"\xc3\x28"])
def test_invalid_utf8_in_a_header_is_refused_naming_the_header(value: bytes) -> None:
    headers = [(b"ce-specversion", b"1.0"), (b"ce-id", b"1"), (b"ce-source", value), (b"ce-type", b"t")]
    exc = refused(from_http, headers, b"")
    assert exc.field == "headers.ce-source" and "not UTF-8" in exc.message
    kafka = [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", value), ("ce_type", b"t")]
    assert refused(from_kafka, kafka, None, b"").field == "headers.ce_source"


def test_invalid_utf8_and_values_weft_cannot_carry_in_a_body() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "t"}
    assert "not UTF-8" in refused(from_http, headers, b'{"a": "\xff"}').message
    assert "not UTF-8" in refused(from_structured, b'{"id": "\xff"}').message
    assert "binary data" in refused(from_http, {**headers, "content-type": "application/octet-stream"}, b"\xff\x00").message
    assert "64-bit" in str(refused(from_http, headers, b'{"n": 100000000000000000000000}'))
    assert "surrogate" in str(refused(from_http, headers, b'["\\ud800"]'))
    assert refused(from_http, headers, b"{not json").field == "body"
    assert "surrogate" in str(refused(from_http, {**headers, "ce-source": "\ud800"}, b""))


def test_header_counts_sizes_and_names_are_bounded() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "t"}
    many = {**headers, **{f"ce-x{i}": "v" for i in range(70)}}
    assert "more than 64" in refused(from_http, many, b"").message
    long = refused(from_http, {**headers, "ce-note": "v" * 5000}, b"")
    assert long.field == "headers.ce-note" and "over the limit of 4096 bytes" in long.message
    assert refused(from_http, {**headers, "ce-my_ext": "v"}, b"").field == "headers.ce-my_ext"
    assert refused(from_http, {**headers, "ce-data": "{}"}, b"").field == "headers.ce-data"
    twice = [*headers.items(), ("ce-id", "2")]
    assert "given twice" in refused(from_binary, twice, b"").message


# ---- NATS and Kafka ------------------------------------------------------------------------


def test_nats_binary_and_structured() -> None:
    binary = sdk_http.to_binary_event(sdk_event(datacontenttype="application/json"))
    event = from_nats({**binary.headers, "Nats-Msg-Id": "x"}, binary.body)
    assert event.id == "o-1" and event.data == {"order_id": 7}
    structured = sdk_http.to_structured_event(sdk_event())
    assert from_nats({"Content-Type": STRUCTURED}, structured.body).data == {"order_id": 7}
    assert from_nats(None, structured.body).id == "o-1"


def test_kafka_binary_and_structured_from_the_sdk() -> None:
    binary = sdk_kafka.to_binary_event(sdk_event(datacontenttype="application/json", partitionkey="cust-9"))
    headers = list(binary.headers.items())
    event = from_kafka(headers, binary.key, binary.value)
    assert event.id == "o-1" and event.data == {"order_id": 7} and event.time == T
    assert event.model_extra == {"partitionkey": "cust-9"}
    structured = sdk_kafka.to_structured_event(sdk_event())
    event = from_kafka(list(structured.headers.items()), b"k-1", structured.value)
    assert event.data == {"order_id": 7} and event.model_extra == {"partitionkey": "k-1"}
    assert from_kafka(headers, b"\xff\xfe", binary.value).model_extra == {"partitionkey": "cust-9"}
    assert "not a CloudEvent" in refused(from_kafka, [], None, b"{}").message
    tombstone = from_kafka(headers, None, None)
    assert tombstone.data is None


def test_binary_data_at_the_depth_limit_is_named_as_the_body_it_came_in() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "t"}
    at_limit = b"[" * 100 + b"]" * 100  # 100 levels: the most a body may hold
    assert from_http(headers, at_limit).data is not None
    over = refused(from_http, headers, b"[" + at_limit + b"]")
    assert over.field.startswith("body[0]") and "nested deeper than 100 levels" in over.message
    long_name = "ce-" + "x" * 30  # over the spec's advice of 20, which producers do not all follow
    assert from_http({**headers, long_name: "v"}, b"").model_extra == {"x" * 30: "v"}
