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
