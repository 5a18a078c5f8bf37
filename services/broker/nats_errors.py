"""The NATS adapter's reading of nats-py's errors: which are worth a retry, which mean
"no such message", and how to say what failed in one line."""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors

_ERR_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
_ERR_MSG_DELETE_FAILED = 10057
_ERR_SEQUENCE_NOT_FOUND = 10043
_ERR_MESSAGE_TOO_BIG = 10054  # over the stream's max_msg_size

# Errors after which the same call may well succeed: the broker is restarting,
# a leader election is running, the reply got lost in a reconnect.
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,  # nats.errors.TimeoutError derives from it
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    OSError,
)
_CLIENT_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, asyncio.TimeoutError, OSError)
# With no stream behind a subject, waiting rarely helps (ensure_streams was not
# run); retry only long enough to ride out a clustered leader election.
_NO_STREAM_RETRY_FOR = 5.0


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, nats.errors.ConnectionClosedError)


def _no_such_message(exc: nats.js.errors.APIError) -> bool:
    # STREAM.MSG.DELETE of a missing sequence: 10057 "no message found" (or 10043, or a 404).
    if isinstance(exc, nats.js.errors.NotFoundError) or exc.err_code == _ERR_SEQUENCE_NOT_FOUND:
        return True
    return exc.err_code == _ERR_MSG_DELETE_FAILED and "no message found" in (exc.description or "")


def _describe(operation: str, exc: BaseException) -> str:
    if isinstance(exc, (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError)):
        return f"{operation} failed: no stream captures this subject (has ensure_streams() run?)"
    if isinstance(exc, asyncio.TimeoutError):
        return f"{operation} timed out"
    return f"{operation} failed"
