"""Pure parts of the front door: trigger filters, cron tick planning, webhook signatures, CloudEvent checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from contracts.triggers import CloudEvent
from services.triggers.cron import plan_ticks, tick_event
from services.triggers.publish import encode, message_id, new_event
from services.triggers.routing import matches, normalise_path
from services.triggers.webhooks import WebhookError, delivery_id, sign, signature, verify, webhook_event

EVENT = {
    "id": "1", "source": "shop", "type": "order.created", "subject": "orders/7",
    "data": {"region": "eu", "total": 12, "vip": True, "items": [{"sku": "A"}], "none": None},
}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, True),
        ({}, True),
        ({"data.region": "eu"}, True),
        ({"data.region": "us"}, False),
        ({"data.region": ["us", "eu"]}, True),
        ({"data.region": ["us", "ca"]}, False),
        ({"data": {"region": "eu"}}, True),  # nested mapping = paths below
        ({"data": {"region": "eu", "total": 12}}, True),
        ({"data.region": "eu", "subject": "orders/8"}, False),  # AND
        ({"subject": "orders/7", "source": "shop"}, True),
        ({"data.items.0.sku": "A"}, True),
        ({"data.items.1.sku": "A"}, False),
        ({"data.missing": None}, False),  # missing is not null
        ({"data.none": None}, True),
        ({"data.vip": True}, True),
        ({"data.vip": 1}, False),  # booleans are not numbers
        ({"data.total": True}, False),
        ({"data.total": 12.0}, True),
        ({"data.region.deeper": "x"}, False),
    ],
)
def test_filter_semantics(spec: dict | None, expected: bool) -> None:
    assert matches(spec, EVENT) is expected


def test_webhook_paths_normalise() -> None:
    assert normalise_path("orders") == normalise_path("/orders/") == "/orders"


UTC = timezone.utc
T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_on_time_tick_runs_once_and_nothing_before_last() -> None:
    plan = plan_ticks("*/5 * * * *", "UTC", T0, T0 + timedelta(minutes=5, seconds=2))
    assert plan.run == [T0 + timedelta(minutes=5)] and plan.skipped == 0
    assert plan_ticks("*/5 * * * *", "UTC", T0 + timedelta(minutes=5), T0 + timedelta(minutes=9)).run == []


def test_a_tick_exactly_now_is_due() -> None:
    assert plan_ticks("*/5 * * * *", "UTC", T0, T0 + timedelta(minutes=5)).run == [T0 + timedelta(minutes=5)]


def test_missed_ticks_skip() -> None:
    now = T0 + timedelta(minutes=60, seconds=5)
    plan = plan_ticks("*/5 * * * *", "UTC", T0, now, missed="skip", grace=60)
    assert plan.run == [T0 + timedelta(minutes=60)]  # the on-time one only
    assert plan.skipped == 11 and plan.latest == T0 + timedelta(minutes=60)


def test_missed_ticks_catch_up_at_most_n() -> None:
    now = T0 + timedelta(minutes=60, seconds=5)
    plan = plan_ticks("*/5 * * * *", "UTC", T0, now, missed="catch_up", limit=3, grace=60)
    assert plan.run == [T0 + timedelta(minutes=m) for m in (45, 50, 55, 60)]
    assert plan.skipped == 8  # 12:05 .. 12:40


def test_catch_up_runs_every_missed_tick_when_there_are_fewer_than_n() -> None:
    plan = plan_ticks("*/5 * * * *", "UTC", T0, T0 + timedelta(minutes=15, seconds=2), missed="catch_up", limit=3)
    assert plan.run == [T0 + timedelta(minutes=m) for m in (5, 10, 15)] and plan.skipped == 0
    late = plan_ticks("*/5 * * * *", "UTC", T0, T0 + timedelta(minutes=12), missed="catch_up", limit=3)
    assert late.run == [T0 + timedelta(minutes=m) for m in (5, 10)] and late.skipped == 0


def test_late_latest_tick_is_missed_too() -> None:
    now = T0 + timedelta(minutes=7)  # the 5-minute tick is 2 minutes old, grace 60s
    assert plan_ticks("*/5 * * * *", "UTC", T0, now, missed="skip", grace=60).run == []
    assert plan_ticks("*/5 * * * *", "UTC", T0, now, missed="catch_up", limit=1, grace=60).run == [
        T0 + timedelta(minutes=5)]


def test_timezone_and_seconds_field() -> None:
    # 09:00 in Paris is 08:00 UTC in winter
    plan = plan_ticks("0 9 * * *", "Europe/Paris", T0, datetime(2024, 1, 2, 8, 0, 30, tzinfo=UTC))
    assert plan.run == [datetime(2024, 1, 2, 8, 0, tzinfo=UTC)]
    plan = plan_ticks("* * * * * */10", "UTC", T0, T0 + timedelta(seconds=25), missed="catch_up", limit=10)
    assert plan.run == [T0 + timedelta(seconds=s) for s in (10, 20)]


def test_tick_event_is_deterministic() -> None:
    a = tick_event("wf", "* * * * *", "UTC", T0)
    b = tick_event("wf", "* * * * *", "UTC", T0.astimezone(timezone(timedelta(hours=2))))
    assert (a.source, a.id) == (b.source, b.id) == ("weft:cron/wf", "2024-01-01T12:00:00Z")


def test_signatures() -> None:
    body, now = b'{"order": 1}', 1_700_000_000
    good = sign("s3cret", body, now)
    assert good.startswith(f"t={now},v1=") and len(good) == len(f"t={now},v1=") + 64
    v1 = good.split("v1=")[1]
    assert verify("s3cret", body, signature({"x-weft-signature": good}), now=now) == v1
    assert verify("s3cret", body, signature({"x-weft-signature": good}), now=now + 300) == v1  # edge of the window
    assert verify("s3cret", body + b" ", signature({"x-weft-signature": good}), now=now) is None
    assert verify("other", body, signature({"x-weft-signature": good}), now=now) is None
    assert verify("s3cret", body, None, now=now) is None
    # the timestamp is signed: moving it breaks the signature
    moved = good.replace(f"t={now}", f"t={now + 100}")
    assert verify("s3cret", body, signature({"x-weft-signature": moved}), now=now) is None
    # a rotated secret: either v1 may match
    both = f"t={now},v1={'0' * 64},v1={v1}"
    assert verify("s3cret", body, signature({"x-weft-signature": both}), now=now) == v1
    # a captured signature replayed after the window
    with pytest.raises(WebhookError, match="300s"):
        verify("s3cret", body, signature({"x-weft-signature": good}), now=now + 301)
    with pytest.raises(WebhookError):
        verify("s3cret", body, signature({"x-weft-signature": good}), now=now - 301, tolerance=300)
    for bad in ("sha256=" + v1, f"v1={v1}", f"t={now}", f"t=x,v1={v1}", f"t={now},v1={v1[:-1]}", "t=1,v1=ü" * 3, ""):
        assert signature({"x-weft-signature": bad}) is None, bad


# The README's recipe, word for word: what a sender runs with curl and openssl.
RECIPE = """
T=$(date +%s)
SIG=$(printf '%s.%s' "$T" "$BODY" | openssl dgst -sha256 -hmac "$SECRET" | awk '{print $NF}')
echo "t=$T,v1=$SIG"
"""


@pytest.mark.skipif(shutil.which("openssl") is None and os.environ.get("CI") != "true",
                    reason="openssl is not installed (required under CI=true)")
def test_the_readme_openssl_recipe_signs_as_the_gateway_checks() -> None:
    body = '{"order_id": "A-1", "note": "50% off, it\'s \\"quoted\\""}'
    env = {"PATH": os.environ["PATH"], "SECRET": "whsec-t3st", "BODY": body}
    header = subprocess.run(["bash", "-c", RECIPE], env=env, capture_output=True, text=True, check=True).stdout.strip()
    sig = signature({"x-weft-signature": header})
    assert sig is not None, header
    assert verify("whsec-t3st", body.encode(), sig, now=time.time()) is not None
    assert header == sign("whsec-t3st", body.encode(), sig.timestamp)


def test_webhook_event_and_delivery_ids() -> None:
    e = webhook_event("/orders/", b'{"a": 1}', "application/json; charset=utf-8", "d-1")
    assert (e.type, e.source, e.subject, e.id, e.data) == ("weft.webhook", "weft:webhook/orders", "/orders", "d-1", {"a": 1})
    assert webhook_event("orders", b"a=1", "application/x-www-form-urlencoded", "d").data == "a=1"
    with pytest.raises(WebhookError):
        webhook_event("orders", b"{nope", "application/json", "d")
    assert delivery_id({"x-weft-delivery": " d-9 "}) == ("d-9", True)
    assert delivery_id({"idempotency-key": "k"}) == ("k", True)
    generated, given = delivery_id({})
    assert not given and generated


def test_published_events_are_structured_mode_cloudevents() -> None:
    e = new_event("order.created", {"a": 1}, id="x", source="s")
    back = CloudEvent.model_validate_json(encode(e))
    assert back == e
    assert b'"subject"' not in encode(e)  # absent attributes are left out, not null
    assert message_id("s", "x") == message_id("s", "x") != message_id("s", "y")
    with pytest.raises(ValueError):
        new_event("not a type!", None)
