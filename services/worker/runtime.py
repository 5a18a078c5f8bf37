"""The worker: pull StepReady, run the handler, publish StepResult, then ack.

Stateless. The order publish-then-ack is what makes a crash harmless: killed
before the publish, the command is redelivered and the step runs again (its
handler has the same idempotency key); killed between publish and ack, the
result is published again with the same message id and deduplicated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import traceback
from collections.abc import Awaitable
from datetime import datetime, timezone
from typing import Any


import weft
from contracts.messages import MessageError, StepError, StepReady, StepResult, decode_ready
from contracts.subjects import STEPS_STREAM, result_subject
from services.broker import Delivery, OutMessage, Transport
from services.broker.batching import Batcher
from services.broker.shelving import Shelf
from services.faults import crash_point
from services.retrying import Backoff
from services.telemetry.hops import result_headers
from services.worker.secrets import Resolved, SecretSource
from services.worker.steps import StepRegistry

log = logging.getLogger("weft.worker")
DURABLE = "workers"
MAX_TRACEBACK = 8_000


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    def __init__(
        self, transport: Transport, registry: StepRegistry, *, concurrency: int = 16, worker_id: str | None = None,
        ack_wait: float = 4.0, max_deliver: int = 20, drain_grace: float = 10.0,
        secrets: SecretSource | None = None,
    ):
        self.transport, self.registry = transport, registry
        self.secrets = secrets or SecretSource()
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self.ack_wait, self.max_deliver, self.drain_grace = ack_wait, max_deliver, drain_grace
        self.completed = 0
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._in_flight: dict[int, tuple[Delivery, float]] = {}
        self._results = Batcher(transport.publish_many)
        # Garbage waits on the shelf for a moment, to go to the DLQ many at a time. It holds
        # ack-pending room while it waits: at most half of what run() allows the consumer.
        self._shelf = Shelf(transport, "poison", STEPS_STREAM, crash="worker.after_dead_letter",
                            what="step message(s)", log=log, most=max(concurrency * 2, 32))

    async def run(self, stop: asyncio.Event) -> None:
        consumer = await self.transport.consumer(
            STEPS_STREAM, DURABLE, ack_wait=self.ack_wait, max_deliver=self.max_deliver,
            max_ack_pending=max(self.concurrency * 4, 64),
        )
        heartbeat = asyncio.create_task(self._heartbeat())
        backoff = Backoff()
        while not stop.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await consumer.fetch(free, timeout=0.5)
                backoff.reset()
            except Exception:
                await backoff.failed(stop, log, "worker: a fetch")
                continue
            # Garbage is told apart here and put on the shelf: a flood of it must not cost
            # a task, a slot and a DLQ write per message.
            poison: list[tuple[Delivery, str]] = []
            for msg in msgs:
                try:
                    ready = decode_ready(msg.data)
                except MessageError as exc:
                    poison.append((msg, str(exc)))
                    continue
                self._spawn(self._guarded(msg, ready))
            if poison:
                self._shelf.put(poison)
        await self._drain()
        await self._shelf.close()
        heartbeat.cancel()
        await consumer.close()

    async def _drain(self) -> None:
        """Graceful stop: no more fetches (the loop has ended); the steps running now get
        `drain_grace` seconds to finish and report; those that don't are handed back (nak)
        for another worker to run at once, instead of waiting out ack_wait."""
        if not self._running:
            return
        log.info("worker stopping: %d step(s) running get %.0fs to finish", len(self._running), self.drain_grace)
        _, unfinished = await asyncio.wait(self._running, timeout=self.drain_grace)
        if not unfinished:
            return
        held = [msg for msg, _ in self._in_flight.values()]
        for task in unfinished:
            task.cancel()
        await asyncio.wait(unfinished, timeout=1.0)
        for msg in held:
            try:
                await msg.nak()
            except Exception:  # noqa: BLE001 - the broker may be away: it redelivers after ack_wait
                log.debug("handing back a step failed", exc_info=True)
        log.warning("worker stopping: handed back %d step(s) that did not finish within %.0fs",
                    len(held), self.drain_grace)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _guarded(self, msg: Delivery, ready: StepReady) -> None:
        try:
            await self.handle(msg, ready)
        except Exception:  # publishing failed: leave unacked, it will be redelivered
            log.exception("worker: could not report a step; it will be redelivered")

    async def handle(self, msg: Delivery, ready: StepReady) -> None:
        if ready.not_before is not None:
            wait = (ready.not_before - datetime.now(timezone.utc)).total_seconds()
            if wait > 0.001:
                # The broker is the timer: hand it back to come again when the backoff is over.
                await msg.nak(delay=wait)
                return
        result = await self.execute(ready, msg)
        try:
            data = result.encode()
        except ValueError as exc:  # an output that cannot travel fails the step, like any error
            result = result.model_copy(update={"status": "failed", "output": None, "error": _error(exc)})
            data = result.encode()
        await self._results.publish(
            OutMessage(subject=result_subject(ready.execution_id), data=data, msg_id=result.message_id,
                       headers=result_headers())
        )
        crash_point("worker.after_publish")
        await msg.ack()
        self.completed += 1

    async def execute(self, ready: StepReady, msg: Delivery | None = None) -> StepResult:
        started = datetime.now(timezone.utc)
        ctx = weft.StepContext(
            execution_id=ready.execution_id, step_id=ready.step_id, attempt=ready.attempt,
            idempotency_key=ready.idempotency_key, item=ready.item, workflow=ready.workflow,
            worker_id=self.worker_id,
        )
        if msg is not None:
            self._in_flight[id(msg)] = (msg, asyncio.get_running_loop().time())
        resolved: Resolved | None = None
        try:
            handler = self.registry.get(ready.step_type)
            # Secrets: resolved here, on the worker, at the last moment (services/worker/secrets.py).
            resolved = self.secrets.resolve(ready)
            output = await asyncio.wait_for(handler(resolved.input, resolved.config, ctx), timeout=ready.timeout)
            error = None
        except asyncio.TimeoutError:
            output, error = None, StepError(type="StepTimeout", message=f"step timed out after {ready.timeout}s")
        except Exception as exc:
            output, error = None, _error(exc)
        finally:
            if msg is not None:
                self._in_flight.pop(id(msg), None)
        if resolved is not None and resolved.values:  # what leaves the worker carries no secret's value
            output, error = resolved.redact(output), resolved.redact_error(error)
        return StepResult(
            execution_id=ready.execution_id, step_id=ready.step_id, item=ready.item, attempt=ready.attempt,
            status="failed" if error else "succeeded", output=output, error=error, worker_id=self.worker_id,
            started_at=started, finished_at=datetime.now(timezone.utc), scheduled_at=ready.scheduled_at,
        )

    async def _heartbeat(self) -> None:
        # Long steps tell the broker they are alive, so it does not redeliver them.
        # One loop for all steps: most steps are short and never need it.
        period = max(self.ack_wait / 3, 0.05)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for msg, started in list(self._in_flight.values()):
                if now - started >= period:
                    try:
                        await msg.in_progress()
                    except Exception:
                        log.debug("in-progress ack failed", exc_info=True)


def _error(exc: BaseException) -> StepError:
    non_retryable = bool(getattr(exc, "non_retryable", False)) or isinstance(exc, weft.NonRetryableError)
    delay: Any = getattr(exc, "next_retry_delay", None)
    tb = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:]
    return StepError(
        type=type(exc).__name__, message=str(exc)[:4000] or type(exc).__name__, traceback=tb,
        non_retryable=non_retryable, next_retry_delay=float(delay) if isinstance(delay, (int, float)) else None,
    )
