"""The nats-py client under `NatsTransport`, and the two things it leaves to us.

1. Coming back after the server closes the connection. nats-py reconnects by
   itself when the TCP connection drops (a server restart), but on an `-ERR`
   from the server other than a stale connection or a permissions violation
   ('Maximum Payload Violation', 'Authorization Violation', ...) it closes the
   client for good (`Client._process_err`), as it does once it runs out of
   reconnect attempts. A closed client never comes back, so `Client` here
   remembers how it was connected and tells its owner when it closes; the
   transport then connects a new one the same way (`NatsTransport._reopen`).

2. Message size. The server counts a message's header block and body together
   against its `max_payload` and closes the connection of a client that sends
   more; nats-py checks the body alone. `wire_size` is what the server counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from nats.aio.client import Client as NATS

# "NATS/1.0\r\n" opens a header block and "\r\n" closes it; each header is "key: value\r\n".
_HEADER_BLOCK = len(b"NATS/1.0\r\n") + 2
_PER_HEADER = len(b": \r\n")


def wire_size(data: bytes, headers: Mapping[str, str] | None) -> int:
    """Bytes of a message as the server counts them against max_payload (HPUB: headers + body)."""
    if not headers:
        return len(data)
    size = len(data) + _HEADER_BLOCK
    for key, value in headers.items():
        size += len(key.strip().encode()) + len(value.strip().encode()) + _PER_HEADER
    return size


class Client(NATS):
    """nats-py's client, remembering its connect() arguments so that a twin can be made,
    and telling `on_closed` when it is closed for good (by us or by the server)."""

    def __init__(self) -> None:
        super().__init__()
        self.connect_args: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        self.on_closed: Callable[[], Awaitable[None]] | None = None

    async def connect(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.connect_args = (args, dict(kwargs))
        theirs = kwargs.get("closed_cb")

        async def closed_cb() -> None:
            if theirs is not None:
                await theirs()
            if self.on_closed is not None:
                await self.on_closed()

        kwargs["closed_cb"] = closed_cb
        await super().connect(*args, **kwargs)

    async def twin(self) -> Client:
        """A new client, connected as this one was (the same servers, options and callbacks)."""
        args, kwargs = self.connect_args
        new = Client()
        try:
            await new.connect(*args, **kwargs)
        except BaseException:  # a timeout cancels us mid-connect: leave nothing running behind
            try:
                await new.close()
            except Exception:  # noqa: BLE001 - the connect error is the one worth raising
                pass
            raise
        return new
