"""contracts.cloudevents against what the NATS client makes of bytes that are not UTF-8."""

from __future__ import annotations

import pytest

from contracts.cloudevents import BindingError, from_nats

HEADERS = {"ce-specversion": "1.0", "ce-source": "s", "ce-type": "t.happened", "ce-id": "1"}


@pytest.mark.parametrize("name", ["ce-id", "ce-source", "ce-subject", "ce-traceid"])
def test_a_replacement_character_in_a_nats_attribute_is_refused_naming_the_header(name: str) -> None:
    # nats-py decodes header values with errors="replace": b"\xff" arrives as U+FFFD
    with pytest.raises(BindingError) as caught:
        from_nats({**HEADERS, name: "a\ufffdb"}, b"{}")
    assert caught.value.field == f"headers.{name}" and "not UTF-8" in caught.value.message


def test_the_same_character_percent_encoded_or_in_the_data_is_text_like_any_other() -> None:
    event = from_nats({**HEADERS, "ce-subject": "a%EF%BF%BDb"}, '{"v": "\ufffd"}'.encode())
    assert event.subject == "a\ufffdb" and event.data == {"v": "\ufffd"}


def test_a_body_of_millions_of_tiny_values_is_refused_before_it_is_parsed() -> None:
    import json
    import resource
    import time

    from contracts.cloudevents import from_batch, from_http
    from contracts.values import MAX_ELEMENTS, elements_in

    for text in ('[]', '{"a":[1,2],"b":{}}', '{"a,b[{":"x\\\\","c":"\\"[,{"}', '[[],[[]],{"k":[]}]', '"a,b"', "1"):
        value, count = json.loads(text), 0
        todo = [value]
        while todo:  # what check_value counts: every value once
            item = todo.pop()
            count += 1
            todo.extend(item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
        assert elements_in(text) == count, text
    body = b"[" + b"{}," * (8 * 1024 * 1024) + b"{}]"  # 24 MiB, 8 million objects: 600 MB once parsed
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(BindingError) as caught:
        from_batch(body)
    assert caught.value.field == "body" and f"more than {MAX_ELEMENTS} elements" in caught.value.message
    assert time.monotonic() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: far from 600 MB
    # commas inside strings are text: a 6 MB CSV in one string is one value
    from_http({"content-type": "application/cloudevents+json"}, json.dumps(
        {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": ",".join(["1"] * 3_000_000)}).encode())
