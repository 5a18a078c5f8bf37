"""Group commit for publishes from many concurrent tasks.

Each of a worker's concurrent steps publishes one result. Sent alone, each is
one stored write (one fsync with `sync_interval: always`); gathered while the
previous batch is being written, they go as one atomic batch. A caller's
`publish` returns only once its own message is stored, as before.

Build it as `Batcher(transport.publish_many)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from services.broker.ports import MessageRejected, OutMessage


class Batcher:
    def __init__(self, send: Callable[[Sequence[OutMessage]], Awaitable[None]], *, max_batch: int = 256):
        self.send = send
        self.max_batch = max_batch
        self._queue: list[tuple[OutMessage, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def publish(self, message: OutMessage) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((message, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        while self._queue:
            await asyncio.sleep(0)  # let the messages of steps finishing right now join
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                await self.send([m for m, _ in batch])
            except MessageRejected as rejected:
                if len(batch) == 1:
                    future = batch[0][1]
                    if not future.done():
                        future.set_exception(rejected)
                    continue
                # One message the broker will never take must not fail the others with it:
                # each is sent alone, and each caller sees what became of its own.
                for message, future in batch:
                    try:
                        await self.send([message])
                    except BaseException as exc:
                        if not future.done():
                            future.set_exception(exc)
                        if isinstance(exc, asyncio.CancelledError):
                            raise
                    else:
                        if not future.done():
                            future.set_result(None)
                continue
            except BaseException as exc:  # each caller sees the failure of its own publish
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
