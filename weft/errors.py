"""The typed errors of weft.Client / weft.AsyncClient: one class per HTTP status of the API's error model.

Each carries the API's `code`, `message`, `problems` (each names a field), `status`, `error_id`
and, for a 503, the `Retry-After` the gateway asked for.
"""

from __future__ import annotations

import httpx

from services.gateway.models import ErrorBody, Problem

__all__ = ["WeftError", "Unauthorized", "Forbidden", "NotFound", "Conflict", "TooLarge", "InvalidRequest",
           "Unavailable", "ServerError", "WaitTimeout", "error_of", "retry_after"]


class WeftError(Exception):
    """An error answer of the API: `status`, `code` (unauthorized, not_found, invalid, ...), `message`,
    `problems` (each names a field), `error_id` (quote it about a 500)."""

    def __init__(self, status: int, code: str, message: str, problems: list[Problem] | None = None,
                 error_id: str | None = None, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.problems = problems or []
        self.error_id, self.retry_after = error_id, retry_after


class Unauthorized(WeftError):
    """401: no API key, or one the gateway does not know."""


class Forbidden(WeftError):
    """403: the key's scopes or workflow bindings forbid this."""


class NotFound(WeftError):
    """404: no such workflow, execution or dead letter (or not one this key may see)."""


class Conflict(WeftError):
    """409: e.g. an Idempotency-Key reused with another input, or a command the execution's state refuses."""


class TooLarge(WeftError):
    """413: the body or a payload is over the limit."""


class InvalidRequest(WeftError):
    """422: invalid input; `problems` names each field."""


class Unavailable(WeftError):
    """503: the store or the broker is unreachable (after the client's retries)."""


class ServerError(WeftError):
    """500 and other unexpected answers."""


class WaitTimeout(WeftError, TimeoutError):
    """`wait` ran out of time; the execution goes on."""


_BY_STATUS: dict[int, type[WeftError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
                                          413: TooLarge, 422: InvalidRequest, 503: Unavailable}


def retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None  # an HTTP date: rare enough to fall back to our own backoff


def error_of(response: httpx.Response) -> WeftError:
    """The typed exception for an error answer (a body that is not the API's error model still gives one)."""
    cls = _BY_STATUS.get(response.status_code, ServerError)
    try:
        detail = ErrorBody.model_validate_json(response.content).error
    except ValueError:
        text = response.text[:500] if response.content else response.reason_phrase
        return cls(response.status_code, "error", text, retry_after=retry_after(response))
    return cls(response.status_code, detail.code, detail.message, detail.problems, detail.error_id,
               retry_after(response))
