"""Garbage off a work queue: into the DLQ in one write, then acked at its source.

The result consumer and the worker both meet messages they cannot decode (or,
for results, cannot place). The rule is the same for both: a message is acked
only once its dead letter is stored, so a crash in between means redelivery,
and the dead letter's id (the source message's identity) makes that harmless.

`Shelf` gathers a flood's garbage for a moment before that write. A stored
write costs the broker much the same whatever it holds (see ATOMIC_BATCH_MIN in
services.broker.nats): shelved a fetch at a time (a few messages), garbage cost
NATS 432 µs of CPU per message all told, gathered on a shelf 361 (bench: a
flood alone, 500 messages/s). The linger is 0.5 s, not 0.1: at 250 messages/s
a 0.1 s shelf holds ~12 per consumer, too few for an atomic write, and the
longer wait took ~60 µs of NATS CPU and ~30 of the process's off each message.
On a machine the broker shares with the services, that is CPU the healthy work
gets back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from contracts.deadletters import message_key
from services.broker.ports import DeadLetter, Delivery, Transport
from services.faults import crash_point
from services.retrying import Throttled


async def shelve(
    transport: Transport, kind: str, stream: str, msgs: Sequence[tuple[Delivery, str]], *,
    crash: str, what: str, log: logging.Logger,
) -> None:
    """Dead-letter `msgs` (each with its reason) from the logical `stream`, then ack them.
    `crash` names the crash point between the two; `what` says what they are, for the log."""
    await transport.dead_letter_many([DeadLetter.of(msg, kind, reason, message_key(stream, msg.stream_seq))
                                      for msg, reason in msgs])
    crash_point(crash)  # stored in the DLQ, not yet acked: redelivery dedups
    for msg, _ in msgs:
        await msg.ack()
    # One line per batch: a flood of garbage must not become a flood of log lines too
    # (each dead letter is in the DLQ with its reason).
    log.warning("%d %s dead-lettered (%s), the first (#%d): %s",
                len(msgs), what, kind, msgs[0][0].stream_seq, " ".join(msgs[0][1].split())[:300])


class Shelf:
    """`shelve` for a stream of garbage: what is put here waits, unacked, up to `linger`
    seconds (or until `most` are waiting) and goes to the DLQ in one write.

    Waiting costs nothing in safety (the messages are not acked until stored; a crash
    means redelivery) and little in time (ack_wait is 30 s). It does hold the source
    consumer's ack-pending budget: `most` must leave room in it for the healthy work.
    `put` never blocks; a write that fails leaves its messages unacked for redelivery."""

    def __init__(
        self, transport: Transport, kind: str, stream: str, *, crash: str, what: str, log: logging.Logger,
        linger: float = 0.5, most: int = 256,
    ):
        self.transport, self.kind, self.stream = transport, kind, stream
        self.crash, self.what, self.log = crash, what, log
        self.linger, self.most = linger, most
        self._waiting: list[tuple[Delivery, str]] = []
        self._full = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._throttled = Throttled(log)

    def put(self, msgs: Sequence[tuple[Delivery, str]]) -> None:
        self._waiting.extend(msgs)
        if len(self._waiting) >= self.most:
            self._full.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_after_linger())

    async def _flush_after_linger(self) -> None:
        try:
            await asyncio.wait_for(self._full.wait(), self.linger)
        except asyncio.TimeoutError:
            pass
        await self.flush()

    async def flush(self) -> None:
        """Shelve everything waiting now (in chunks of `most`)."""
        while self._waiting:
            self._full.clear()
            batch, self._waiting = self._waiting[: self.most], self._waiting[self.most :]
            try:
                await shelve(self.transport, self.kind, self.stream, batch, crash=self.crash, what=self.what,
                             log=self.log)
            except Exception as exc:  # the DLQ is out of reach: left unacked, they come back
                self._throttled.failure(f"shelve:{type(exc).__name__}", "could not dead-letter %d %s; they will be "
                                        "redelivered", len(batch), self.what, exc=exc, level=logging.ERROR)

    async def close(self) -> None:
        """Shelve what waits, then return (a graceful stop)."""
        if self._flusher is not None:
            self._full.set()  # no more lingering
            await self._flusher
        await self.flush()
