"""The worker: pull StepReady, run the handler, publish StepResult, then ack.

Stateless. The order publish-then-ack is what makes a crash harmless: killed
before the publish, the command is redelivered and the step runs again (its
handler has the same idempotency key); killed between publish and ack, the
result is published again with the same message id and deduplicated.

Two ways a command could otherwise come back forever: a result the broker will
never take (too large) fails the attempt non-retryably with that error instead;
a command that kills the worker process itself is, after `poison_deliveries`
unexplained deliveries, not run again but failed as a PoisonMessage
(services.broker.redelivery), so the orchestrator dead-letters the step and the
execution ends.
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

from contracts.messages import MessageError, StepError, StepReady, StepResult, decode_ready, task_of
from contracts.payloads import MARKER, PayloadError, PayloadTooLarge, encode
from contracts.subjects import STEPS_STREAM, result_subject
from services.broker import Delivery, MessageRejected, OutMessage, Transport
from services.broker.batching import Batcher
from services.broker.redelivery import TIMER_ALLOWANCE, CrashGuard, poison_reason
from services.broker.shelving import Shelf
from services.faults import crash_point
from services.payloads import Claims
from services.retrying import Backoff, Throttled
from services.telemetry.hops import result_headers
from services.worker.secrets import Resolved, SecretSource
from services.worker.steps import StepRegistry
from weft.steps import NonRetryableError, StepContext

log = logging.getLogger("weft.worker")
DURABLE = "workers"
MAX_TRACEBACK = 8_000
ALONE_FOR = 5.0  # seconds a redelivered command runs alone before the worker takes other work again


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    def __init__(
        self, transport: Transport, registry: StepRegistry, *, concurrency: int = 16, worker_id: str | None = None,
        ack_wait: float = 4.0, max_deliver: int = 20, drain_grace: float = 10.0,
        secrets: SecretSource | None = None, claims: Claims | None = None, poison_deliveries: int = 5,
    ):
        self.transport, self.registry = transport, registry
        self.secrets = secrets or SecretSource()
        # References in a step's input are resolved before the step runs, and an output over the
        # inline limit is stored after it (the claim check). Without a blob store (a worker built
        # by hand in a test) a reference is an error and big outputs travel inline.
        self.claims = claims
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self.ack_wait, self.max_deliver, self.drain_grace = ack_wait, max_deliver, drain_grace
        self.completed = 0
        self.poison_deliveries, self.poisoned = poison_deliveries, 0
        self.guard = CrashGuard(poison_deliveries, careful_for=2 * ack_wait)
        self._throttled = Throttled(log)
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
        guard = self.guard = CrashGuard(self.poison_deliveries, careful_for=2 * self.ack_wait,
                                        unacked_at_start=getattr(consumer, "unacked_at_start", 1))
        heartbeat = asyncio.create_task(self._heartbeat())
        backoff = Backoff()
        while not stop.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await consumer.fetch(1 if guard.careful else free, timeout=0.5)
                backoff.reset()
            except Exception:
                await backoff.failed(stop, log, "worker: a fetch")
                continue
            # Garbage is told apart here and put on the shelf: a flood of it must not cost
            # a task, a slot and a DLQ write per message.
            poison: list[tuple[Delivery, str]] = []
            suspects: list[tuple[Delivery, StepReady]] = []
            for msg in msgs:
                if guard.poisoned(msg, TIMER_ALLOWANCE):  # past anything a retry's timer explains: do not even decode
                    self._spawn(self._poisoned(msg, None))
                    continue
                try:
                    ready = decode_ready(msg.data)
                except MessageError as exc:
                    poison.append((msg, str(exc)))
                    continue
                allowance = TIMER_ALLOWANCE if ready.not_before is not None else 0
                if _backoff_left(ready) > 0.001:
                    self._spawn(self._guarded(msg, ready))  # handed back to the broker until then
                elif guard.poisoned(msg, allowance):
                    self._spawn(self._poisoned(msg, ready))
                elif guard.suspect(msg, allowance):
                    suspects.append((msg, ready))
                else:
                    self._spawn(self._guarded(msg, ready))
            if poison:
                self._shelf.put(poison)
            if suspects:
                await self._alone(suspects)
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

    async def _alone(self, suspects: list[tuple[Delivery, StepReady]]) -> None:
        """Run redelivered commands one at a time with nothing else running: if one of them kills
        the process, it is the only one whose delivery count that crash raises. A crash comes
        early; a step that runs long is no reason to keep the others waiting, so each wait is
        bounded (ALONE_FOR seconds), and after it the worker goes on as usual."""
        loop = asyncio.get_running_loop()
        alone_for = min(self.ack_wait, ALONE_FOR)
        for msg, _ in suspects:  # keep them from timing out while they wait their turn
            self._in_flight[id(msg)] = (msg, loop.time())
        try:
            for msg, ready in suspects:
                if self._running:
                    await asyncio.wait(self._running, timeout=alone_for)
                self._in_flight.pop(id(msg), None)
                task = asyncio.ensure_future(self._guarded(msg, ready))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                await asyncio.wait({task}, timeout=alone_for)
        finally:
            for msg, _ in suspects:
                self._in_flight.pop(id(msg), None)

    async def _guarded(self, msg: Delivery, ready: StepReady) -> None:
        try:
            await self.handle(msg, ready)
        except Exception as exc:  # publishing failed: leave unacked, it will be redelivered
            self.guard.survived(msg)
            self._throttled.failure(f"report:{type(exc).__name__}",
                                    "worker: could not report a step; it will be redelivered", exc=exc)

    async def handle(self, msg: Delivery, ready: StepReady) -> None:
        wait = _backoff_left(ready)
        if wait > 0.001:
            # The broker is the timer: hand it back to come again when the backoff is over.
            self.guard.survived(msg)
            await msg.nak(delay=wait)
            return
        crash_point("worker.handle", ready.execution_id)
        result = await self.execute(ready, msg)
        try:
            data = result.encode()
        except ValueError as exc:  # an output that cannot travel fails the step, like any error
            result = result.model_copy(update={"status": "failed", "output": None, "error": _error(exc)})
            data = result.encode()
        try:
            await self._results.publish(
                OutMessage(subject=result_subject(ready.execution_id), data=data, msg_id=result.message_id,
                           headers=result_headers(), key=ready.execution_id)
            )
        except MessageRejected as exc:
            # The broker will never take this result (too large, say): sent again it would only come
            # back forever. The attempt fails with that error, for good, as an output that cannot be
            # encoded does; the failed result is small. Nothing was stored under its id.
            error = StepError(type=type(exc).__name__, message=f"the step's result cannot be published: {exc}",
                              non_retryable=True)
            result = result.model_copy(update={"status": "failed", "output": None, "error": error})
            await self._results.publish(OutMessage(subject=result_subject(ready.execution_id), data=result.encode(),
                                                   msg_id=result.message_id, key=ready.execution_id))
        crash_point("worker.after_publish")
        await msg.ack()
        self.guard.done(msg)
        self.completed += 1

    async def _poisoned(self, msg: Delivery, ready: StepReady | None) -> None:
        """A command delivered too often without an ack (it killed or stalled the workers that ran it):
        not run again, but reported as a failed attempt that is not to be retried, so that the
        orchestrator dead-letters the step and its execution ends. One it cannot even name goes
        to the DLQ as it is."""
        reason = poison_reason(msg.delivered, "worker")
        task = (ready.execution_id, ready.step_id, ready.item, ready.attempt) if ready else task_of(msg.msg_id)
        try:
            if task is None:
                self._shelf.put([(msg, reason)])
                return
            eid, step_id, item, attempt = task
            now = datetime.now(timezone.utc)
            result = StepResult(
                execution_id=eid, step_id=step_id, item=item, attempt=attempt, status="failed",
                error=StepError(type="PoisonMessage", message=reason, non_retryable=True),
                worker_id=self.worker_id, started_at=now, finished_at=now,
                scheduled_at=ready.scheduled_at if ready else None,
            )
            await self._results.publish(OutMessage(subject=result_subject(eid), data=result.encode(),
                                                   msg_id=result.message_id, key=eid))
            await msg.ack()
            self.guard.done(msg)
            self.poisoned += 1
            self._throttled.failure("poison", "worker: step %s of execution %s was %s; failed as PoisonMessage",
                                    step_id, eid, reason)
        except Exception as exc:  # the broker is away: it comes back, and is still poison then
            self._throttled.failure(f"poison-report:{type(exc).__name__}",
                                    "worker: could not report a poison command; it will be redelivered", exc=exc)

    async def execute(self, ready: StepReady, msg: Delivery | None = None) -> StepResult:
        started = datetime.now(timezone.utc)
        ctx = StepContext(
            execution_id=ready.execution_id, step_id=ready.step_id, attempt=ready.attempt,
            idempotency_key=ready.idempotency_key, item=ready.item, workflow=ready.workflow,
            workflow_version=ready.workflow_version, worker_id=self.worker_id,
        )
        if msg is not None:
            self._in_flight[id(msg)] = (msg, asyncio.get_running_loop().time())
        resolved: Resolved | None = None
        try:
            handler = self.registry.get(ready.step_type)
            data = ready.input
            if msg is None or MARKER in msg.data:  # a substring test spares the walk on most steps
                data = await self._resolve(data)
            # Secrets: resolved here, on the worker, at the last moment (services/worker/secrets.py).
            resolved = self.secrets.resolve(ready, input=data)
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
        if error is None and self.claims is not None:
            # Measured here, on the loop (a small output costs an encode, ~1 µs); only a big one goes
            # to a thread, to be stored. After redaction: the blob store keeps no secret either.
            try:
                encoded = encode(output, "the step's output")
                if len(encoded) > self.claims.limits.inline:
                    output = await asyncio.to_thread(self.claims.store_output, output, data=encoded)
            except PayloadTooLarge as exc:  # retrying makes the same output: fail for good, say why
                output, error = None, StepError(type="PayloadTooLarge", message=str(exc), non_retryable=True)
            except Exception as exc:
                output, error = None, _error(exc)
        return StepResult(
            execution_id=ready.execution_id, step_id=ready.step_id, item=ready.item, attempt=ready.attempt,
            status="failed" if error else "succeeded", output=output, error=error, worker_id=self.worker_id,
            started_at=started, finished_at=datetime.now(timezone.utc), scheduled_at=ready.scheduled_at,
        )

    async def _resolve(self, value: Any) -> Any:
        from contracts.payloads import refs_in

        if not refs_in(value):
            return value
        if self.claims is None:
            raise PayloadError("the step's input holds a stored payload, and this worker has no blob store")
        return await asyncio.to_thread(self.claims.resolve, value)

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


def _backoff_left(ready: StepReady) -> float:
    """Seconds until a retry's backoff is over (<= 0 when it is, or when there is none)."""
    if ready.not_before is None:
        return 0.0
    return (ready.not_before - datetime.now(timezone.utc)).total_seconds()


def _error(exc: BaseException) -> StepError:
    non_retryable = bool(getattr(exc, "non_retryable", False)) or isinstance(exc, NonRetryableError)
    delay: Any = getattr(exc, "next_retry_delay", None)
    tb = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:]
    return StepError(
        type=type(exc).__name__, message=str(exc)[:4000] or type(exc).__name__, traceback=tb,
        non_retryable=non_retryable, next_retry_delay=float(delay) if isinstance(delay, (int, float)) else None,
    )
