"""The client's pure parts: backoff honours Retry-After, error bodies map to typed errors, the SSE reader."""

from __future__ import annotations

import httpx

from weft.client import _backoff, _Sse
from weft.errors import Conflict, ServerError, TooLarge, Unavailable, error_of
from weft.errors import retry_after as _retry_after


def test_retry_after_wins_over_the_backoff_and_is_capped() -> None:
    assert _backoff(0, 3.0, 0.2, 10.0) == 3.0
    assert _backoff(5, 120.0, 0.2, 10.0) == 10.0
    assert 0.1 <= _backoff(0, None, 0.2, 10.0) <= 0.2
    assert 0.8 <= _backoff(3, None, 0.2, 10.0) <= 1.6
    assert _retry_after(httpx.Response(503, headers={"Retry-After": "2"})) == 2.0
    assert _retry_after(httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None


def test_error_bodies_become_typed_errors() -> None:
    body = {"error": {"code": "idempotency_conflict", "message": "m", "problems": [{"field": "body.x", "message": "p"}]}}
    err = error_of(httpx.Response(409, json=body))
    assert isinstance(err, Conflict) and err.code == "idempotency_conflict" and err.problems[0].field == "body.x"
    assert isinstance(error_of(httpx.Response(413, text="too big")), TooLarge)
    assert isinstance(error_of(httpx.Response(503, headers={"Retry-After": "1"})), Unavailable)
    odd = error_of(httpx.Response(502, text="<html>bad gateway</html>"))
    assert isinstance(odd, ServerError) and odd.status == 502 and "bad gateway" in odd.message


def test_the_sse_reader() -> None:
    sse, got = _Sse(), []
    for line in [": keep-alive", "", "id: 3", "event: StepSucceeded", "data: {\"a\":", "data: 1}", "", "event: end",
                 "data: {}", ""]:
        event = sse.feed(line)
        if event:
            got.append(event)
    assert got == [("StepSucceeded", "3", "{\"a\":\n1}"), ("end", "3", "{}")]
