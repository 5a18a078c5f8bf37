"""Publishing for the NATS adapter: one message, or many at once as JetStream atomic
batches (one stored write per batch) or pipelined. A mixin of `NatsTransport`."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import nats.errors
import nats.js.errors

from services.broker.nats_errors import _CLIENT_ERRORS, _ERR_MESSAGE_TOO_BIG
from services.broker.ports import BrokerError, MessageRejected, OutMessage

log = logging.getLogger("services.broker.nats")

MSG_ID_HEADER = "Nats-Msg-Id"

# JetStream accepts at most 1,000 messages in one atomic batch.
ATOMIC_BATCH_MAX = 500
# Below this many messages a batch goes pipelined instead. Measured on nats-server 2.15 with
# `sync_interval: always` (2-core VM), server CPU: an atomic batch about 1.2 ms per batch plus
# 8 us per message, pipelined 85-110 us per message; they break even at about 16.
ATOMIC_BATCH_MIN = 16


def _one_stream(messages: Sequence[OutMessage]) -> bool:
    # Weft's streams are told apart by the first two subject tokens (weft.steps, weft.results, ...).
    first = messages[0].subject.split(".", 2)[:2]
    return all(m.subject.split(".", 2)[:2] == first for m in messages)


class Publishing:
    """`NatsTransport`'s publishing (it provides `_js`, `_nc`, `subject`, `_check_size`, `_retrying`)."""

    # ---- publishing -----------------------------------------------------

    def _headers(self, message: OutMessage) -> dict[str, str] | None:
        if not message.headers and not message.msg_id:
            return None
        headers = dict(message.headers) if message.headers else {}
        if message.msg_id:
            headers[MSG_ID_HEADER] = message.msg_id
        return headers

    async def publish(self, message: OutMessage) -> bool:
        subject = self.subject(message.subject)
        headers = self._headers(message)
        self._check_size(message, headers)
        ack = await self._retrying(
            "publish",
            message.subject,
            lambda timeout: self._js.publish(subject, message.data, timeout=timeout, headers=headers),
        )
        return not ack.duplicate

    async def publish_many(self, messages: Sequence[OutMessage]) -> None:
        """Publish many messages, returning when all are stored.

        Messages bound for one stream go as JetStream atomic batches: the server
        stores a batch in one write, which with `sync_interval: always` is one
        fsync instead of one per message (several times the throughput). An
        atomic batch is refused whole if it holds a message id the stream has
        already seen (a relay republishing after a crash, say); such a batch,
        or one that fails for any other reason, is sent again message by
        message, where the broker drops each duplicate on its own.
        """
        if not messages:
            return
        for message in messages:  # one too large fails the call before any is sent
            self._check_size(message, self._headers(message), operation="publish_many")
        if len(messages) >= ATOMIC_BATCH_MIN and self._atomic and _one_stream(messages):
            for start in range(0, len(messages), ATOMIC_BATCH_MAX):
                chunk = messages[start : start + ATOMIC_BATCH_MAX]
                if len(chunk) < ATOMIC_BATCH_MIN:
                    await self._publish_pipelined(chunk)
                    continue
                try:
                    await self._publish_atomic(chunk)
                    continue
                except (BrokerError, asyncio.TimeoutError, *_CLIENT_ERRORS) as exc:
                    log.debug("atomic batch of %d not stored (%s): sending one by one", len(chunk), exc)
                await self._publish_pipelined(chunk)
            return
        await self._publish_pipelined(messages)

    async def _publish_atomic(self, messages: Sequence[OutMessage]) -> None:
        batch_id = uuid.uuid4().hex
        last = len(messages)
        batch: list[tuple[OutMessage, dict[str, str]]] = []
        for i, message in enumerate(messages, 1):
            headers = self._headers(message) or {}
            headers["Nats-Batch-Id"] = batch_id
            headers["Nats-Batch-Sequence"] = str(i)
            if i == last:
                headers["Nats-Batch-Commit"] = "1"
            # The batch headers may tip one over: then nothing of the batch is sent (it goes one by one).
            self._check_size(message, headers, operation="publish_many")
            batch.append((message, headers))
        for i, (message, headers) in enumerate(batch, 1):
            subject = self.subject(message.subject)
            if i < last:
                await self._nc.publish(subject, message.data, headers=headers)
                continue
            reply = await self._nc.request(subject, message.data, headers=headers, timeout=self._request_timeout)
            ack = json.loads(reply.data or b"{}")
            if "error" in ack or ack.get("count") != last:
                error = ack.get("error") or {}
                raise BrokerError(
                    f"atomic batch refused: {error.get('description') or ack}", operation="publish_many",
                    subject=message.subject, retryable=False,
                )

    async def _publish_pipelined(self, messages: Sequence[OutMessage]) -> None:
        """Pipelined publish; messages that failed transiently are resent (same msg id) until the deadline.

        Without msg ids a resend may store a message twice (at-least-once).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._publish_retry_for
        todo = list(range(len(messages)))
        delay = 0.05
        while True:
            failures = await self._pipeline(messages, todo)
            if not failures:
                return
            fatal = [(i, e) for i, e in failures if not self._transient(e)]
            if fatal or loop.time() + delay >= deadline:
                index, exc = (fatal or failures)[0]
                if isinstance(exc, nats.js.errors.APIError) and exc.err_code == _ERR_MESSAGE_TOO_BIG:
                    raise MessageRejected(f"publish refused: {exc.description}", operation="publish_many",
                                          subject=messages[index].subject) from exc
                raise BrokerError(
                    f"{len(failures)} of {len(messages)} messages were not stored "
                    f"(first: #{index}, {type(exc).__name__})",
                    operation="publish_many",
                    subject=messages[index].subject,
                    retryable=not fatal,
                ) from exc
            self._reopen_if_closed()
            todo = sorted(i for i, _ in failures)
            log.info("publish_many: resending %d unacked messages", len(todo))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _pipeline(self, messages: Sequence[OutMessage], indexes: list[int]) -> list[tuple[int, BaseException]]:
        loop = asyncio.get_running_loop()
        window = asyncio.Semaphore(self._publish_window)
        inflight: list[tuple[int, asyncio.Future[Any]]] = []
        failures: list[tuple[int, BaseException]] = []
        timeout = self._request_timeout
        for index in indexes:
            message = messages[index]
            # Every slot is given back by an ack, an error, or the ack timer below.
            await window.acquire()
            try:
                # wait_stall=None: the context's own cap is larger than the window,
                # so this never waits, and without a timeout it does not yield to
                # the loop either: the flusher then writes many messages per send.
                future = await self._js.publish_async(
                    self.subject(message.subject),
                    message.data,
                    headers=self._headers(message),
                    wait_stall=None,
                )
            except _CLIENT_ERRORS as exc:
                window.release()
                failures.append((index, exc))
                continue
            # nats-py's ack futures never time out by themselves: an ack lost in
            # a reconnect would hold its slot forever.
            timer = loop.call_later(timeout, future.cancel)

            def _done(_f: asyncio.Future[Any], timer: asyncio.TimerHandle = timer) -> None:
                timer.cancel()
                window.release()

            future.add_done_callback(_done)
            inflight.append((index, future))
        if inflight:
            await asyncio.wait([f for _, f in inflight])
        for index, future in inflight:
            if future.cancelled():
                failures.append((index, asyncio.TimeoutError(f"no ack within {timeout:g}s")))
            elif (exc := future.exception()) is not None:
                failures.append((index, exc))
        return failures
