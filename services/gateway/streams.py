"""Live streams (Server-Sent Events: `/v1/changes`, `/v1/executions/{id}/events`), bounded.

A stream holds a connection, a coroutine and a store poll every `sse_poll` seconds for as
long as the client stays, so the gateway keeps at most `max_streams` of them open at once, and
at most half of them for one key; one more is answered 503 with Retry-After (the console's
client retries), naming the limit.

A client that stops reading (or a peer that vanished without a FIN) does not grow the
gateway's memory: uvicorn stops our writes once the socket's buffers are full (flow
control), so at most the transport's high-water mark is held. But the stream would then
hold its slot forever; a write the client has not taken within `sse_write_timeout` seconds
ends the stream (the server closes the connection) and frees the slot. Heartbeats every
`sse_heartbeat` seconds make sure a stalled peer is noticed even when nothing happens.

A stream is authenticated when it opens, and its key again every `key_recheck` seconds: a key
revoked while its stream is open stops receiving within seconds, like everywhere else (the
stream ends; the reconnect gets 401).

Resuming: each event carries `id: <n>` (a log position or an execution's seq), and a
client sends the last one back as `Last-Event-ID`; it must be such a number.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from services.gateway.auth import token_of
from services.gateway.errors import error_response, invalid

log = logging.getLogger("weft.gateway")
MAX_ID = 2**62  # positions and seqs are 64-bit integers in both stores


def resume_after(raw: str | None) -> int | None:
    """The `Last-Event-ID` header as a position: ASCII digits only, at most 2**62 (what the
    streams send). Anything else is a 422 naming the header, not a stream that breaks later."""
    text = (raw or "").strip()
    if not text:  # no id yet (an EventSource sends none before its first event)
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_ID:
        raise invalid("header.last-event-id", f"not an id this stream sent: a whole number from 0 to {MAX_ID}")
    return int(text)


class KeyCheck:
    """Is the key a live stream was opened with still active? Asked on every poll, it looks at most
    every `ctx.key_recheck` seconds (Keys caches a key for 2 s, so this is rarely a store read)."""

    def __init__(self, request: Any) -> None:
        self.ctx = request.app.state.ctx
        self.token = token_of(request) if self.ctx.auth.enabled else None
        self.due = time.monotonic() + self.ctx.key_recheck

    async def revoked(self) -> bool:
        if self.token is None or time.monotonic() < self.due:
            return False
        self.due = time.monotonic() + self.ctx.key_recheck
        return await asyncio.to_thread(self.ctx.keys.authenticate, self.token) is None


class _Stalled(Exception):
    pass


class LiveStream(StreamingResponse):
    """A StreamingResponse that takes one of the gateway's stream slots for its lifetime and
    gives up on a client that takes no data for `ctx.sse_write_timeout` seconds."""

    def __init__(self, ctx: Any, content: AsyncIterator[bytes], what: str, key_id: str) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ctx, self.what, self.key_id = ctx, what, key_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self.ctx
        per_key = max(1, ctx.max_streams // 2)  # one key (a leaked one, say) cannot take every slot
        mine = ctx.streams_by_key.get(self.key_id, 0)
        full = None
        if ctx.open_streams >= ctx.max_streams:
            full = (f"{ctx.open_streams} live streams are open on this gateway, the limit is {ctx.max_streams} "
                    "(WEFT_GATEWAY_MAX_STREAMS)", f"at most {ctx.max_streams} open at once")
        elif mine >= per_key:
            full = (f"this key has {mine} live streams open, the limit for one key is {per_key} (half of "
                    "WEFT_GATEWAY_MAX_STREAMS)", f"at most {per_key} open at once for one key")
        if full is not None:
            await self._close_iterator()
            await error_response(503, f"{full[0]}; try again shortly", problems=[{"field": "streams", "message": full[1]}],
                                 headers={"Retry-After": "5"})(scope, receive, send)
            return
        ctx.open_streams += 1
        ctx.streams_by_key[self.key_id] = mine + 1
        try:
            await super().__call__(scope, receive, send)
        finally:
            ctx.open_streams -= 1
            left = ctx.streams_by_key.get(self.key_id, 1) - 1
            if left > 0:
                ctx.streams_by_key[self.key_id] = left
            else:
                ctx.streams_by_key.pop(self.key_id, None)
            await self._close_iterator()

    async def stream_response(self, send: Send) -> None:
        timeout = self.ctx.sse_write_timeout

        async def timed(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), timeout)
            except asyncio.TimeoutError:
                raise _Stalled from None

        try:
            await super().stream_response(timed)
        except _Stalled:
            # Returning without finishing the response makes the server close the connection.
            log.warning("%s: the client took no data for %.0fs; stream ended", self.what, timeout)

    async def _close_iterator(self) -> None:
        close = getattr(self.body_iterator, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:  # noqa: BLE001 - a generator failing as it closes changes nothing here
                pass
