"""The trigger consumer: CloudEvents from the WEFT_TRIGGERS stream to started executions.

Pulls a batch, decodes each message as a CloudEvent (structured or binary mode of the
NATS binding, contracts/cloudevents.py), ingests the valid ones
in one store transaction (services.triggers.ingest) and acks only after that
commit: a crash before the ack means redelivery, which the trigger log turns
into acked duplicates. Nothing is dropped:
  - not a CloudEvent, or published on a topic that is not its type's:
    dead-lettered as `trigger_invalid`, with the validation errors;
  - a type no workflow subscribes to: dead-lettered as `trigger_unroutable`;
  - a workflow whose input schema rejects the event's data: the other
    workflows start; that one is recorded in the trigger log and dead-lettered
    as `trigger_invalid` naming the workflow and the field;
  - the store away for longer than the redelivery budget: dead-lettered as
    `trigger_failed` on the last delivery, rather than dropped by the broker;
  - an event whose handling kills the process (services.broker.redelivery):
    after `poison_deliveries` unexplained deliveries, dead-lettered as
    `trigger_failed` without being handled again. Redelivered events are
    handled alone, so an innocent one is not blamed with it.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError

from contracts.cloudevents import BindingError, from_kafka, from_nats, from_structured, has_prefix
from contracts.deadletters import REPROCESSED_FROM_HEADER, message_key
from contracts.subjects import TRIGGERS_PREFIX, TRIGGERS_STREAM, trigger_subject
from contracts.triggers import CloudEvent
from services.broker import Consumer, DeadLetter, Delivery, Transport
from services.broker.redelivery import CrashGuard, poison_reason
from services.faults import crash_point
from services.retrying import Backoff
from services.triggers.ingest import Ingestor, Outcome, Trigger
from services.triggers.publish import message_id, rejected_letters

log = logging.getLogger("weft.triggers")
DURABLE = "triggers"


def describe(exc: ValidationError) -> str:
    """Pydantic errors as `field: message; ...`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<event>"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def decode(msg: Delivery, binding: str = "nats") -> CloudEvent:
    """The CloudEvent in a message, or ValueError saying what is wrong with it (contracts.cloudevents
    names the field and the limit). `binding` is the broker's CloudEvents binding: "nats" (structured:
    the body is the event; binary: `ce-*` headers, the body is the data) or "kafka" (structured:
    `content-type: application/cloudevents+json`, the value is the event; binary: `ce_*` headers)."""
    prefix = "ce_" if binding == "kafka" else "ce-"
    try:
        event = _from_kafka(msg) if binding == "kafka" else from_nats(msg.headers, msg.data)
    except BindingError as exc:
        mode = "binary" if has_prefix(msg.headers.items(), prefix) else "structured"
        raise ValueError(f"not a valid CloudEvent ({mode} mode): {exc}") from None
    expected = trigger_subject(event.type)
    # A Kafka producer that is not Weft addresses the triggers topic, not a subject in it: Kafka's
    # permissions are per topic, so there is no finer address to hold the event's type to.
    foreign = binding == "kafka" and msg.subject == TRIGGERS_PREFIX
    if msg.subject != expected and not foreign:
        # Subject-level broker permissions would mean nothing if the body could name another type.
        raise ValueError(f"published on {msg.subject!r}, but an event of type {event.type!r} belongs on {expected!r}")
    return event


def _from_kafka(msg: Delivery) -> CloudEvent:
    from services.broker.kafka_consumer import PARTITION_KEY_HEADER

    pairs = [(k, v.encode()) for k, v in msg.headers.items() if not k.lower().startswith("weft-kafka-")]
    if not has_prefix(pairs, "ce_") and not any(k.lower() == "content-type" for k, _ in pairs):
        # Neither mode's mark: read it as an event in JSON, as the NATS binding does, so that
        # garbage is named for what it is ("not JSON", "id: Field required").
        return from_structured(msg.data, "value")
    return from_kafka(pairs, msg.headers.get(PARTITION_KEY_HEADER), msg.data)


class TriggerConsumer:
    def __init__(
        self, ingestor: Ingestor, transport: Transport, *, batch: int = 500, ack_wait: float = 30.0,
        max_deliver: int = 20, durable: str = DURABLE, poison_deliveries: int = 5,
    ):
        self.ingestor, self.transport = ingestor, transport
        self.batch, self.ack_wait, self.max_deliver, self.durable = batch, ack_wait, max_deliver, durable
        self.poison_deliveries = poison_deliveries
        self.binding = str(getattr(transport, "cloudevents_binding", "nats"))  # how CloudEvents ride its messages
        self.guard = CrashGuard(poison_deliveries, careful_for=2 * ack_wait)
        self.consumer: Consumer | None = None
        self.received = self.handled = self.invalid = self.unroutable = self.failed = 0  # handled: acked

    async def run(self, stop: asyncio.Event) -> None:
        self.consumer = await self.transport.consumer(
            TRIGGERS_STREAM, self.durable, ack_wait=self.ack_wait, max_deliver=self.max_deliver,
            max_ack_pending=self.batch * 8,
        )
        guard = self.guard = CrashGuard(self.poison_deliveries, careful_for=2 * self.ack_wait,
                                        unacked_at_start=getattr(self.consumer, "unacked_at_start", 1))
        backoff = Backoff()
        while not stop.is_set():
            try:
                msgs = await self.consumer.fetch(1 if guard.careful else self.batch, timeout=0.5)
            except Exception:
                await backoff.failed(stop, log, "triggers: a fetch")
                continue
            if not msgs:
                continue
            try:
                await self.handle(msgs)
                backoff.reset()
            except Exception as exc:  # store or broker away: nothing acked, so all comes back
                for msg in msgs:  # ... and this process lived through it: not a crash
                    guard.survived(msg)
                await self._give_up_on_last_tries(msgs, exc, backoff.delay)
                await backoff.failed(stop, log, f"triggers: a batch of {len(msgs)}")
        await self.consumer.close()

    async def handle(self, msgs: list[Delivery]) -> None:
        """First deliveries in one batch; redelivered ones each alone, after them; poison not at all."""
        fresh: list[Delivery] = []
        suspects: list[Delivery] = []
        poison: list[Delivery] = []
        for msg in msgs:
            if self.guard.poisoned(msg):
                poison.append(msg)
            elif self.guard.suspect(msg):
                suspects.append(msg)
            else:
                fresh.append(msg)
        if poison:  # keyed like _give_up_on_last_tries' letters: one dead letter per message
            letters = [DeadLetter.of(msg, "trigger_failed", poison_reason(msg.delivered, "trigger consumer"),
                                     message_key(TRIGGERS_STREAM, msg.stream_seq)) for msg in poison]
            self.received += len(poison)
            self.failed += len(poison)
            await self.transport.dead_letter_many(letters)
            _log_letters(letters)
            for msg in poison:
                await msg.ack()
                self.guard.done(msg)
            self.handled += len(poison)
        if fresh:
            await self._handle(fresh)
        for msg in suspects:
            await self._handle([msg])

    async def _handle(self, msgs: list[Delivery]) -> None:
        self.received += len(msgs)
        good: list[tuple[Delivery, Trigger]] = []
        letters: list[DeadLetter] = []
        for msg in msgs:
            try:
                good.append((msg, Trigger(decode(msg, self.binding), via="topic")))
            except ValueError as exc:
                self.invalid += 1
                letters.append(DeadLetter.of(msg, "trigger_invalid", str(exc), message_key(TRIGGERS_STREAM, msg.stream_seq)))
        if good:
            for _, trigger in good:
                crash_point("triggers.handle", trigger.event.id)
            outcomes = await asyncio.to_thread(self.ingestor.ingest, [t for _, t in good])
            crash_point("triggers.after_append")
            for (msg, trigger), outcome in zip(good, outcomes):
                letters += self._settle(msg, trigger, outcome)
        if letters:
            # The batch's dead letters in one write (one fsync, not one each), before any ack:
            # a crash in between redelivers the batch, and their ids make that harmless.
            await self.transport.dead_letter_many(letters)
            crash_point("triggers.after_dead_letter")
            _log_letters(letters)
        for msg in msgs:
            await msg.ack()
            self.guard.done(msg)
        self.handled += len(msgs)

    def _settle(self, msg: Delivery, trigger: Trigger, outcome: Outcome) -> list[DeadLetter]:
        # Keyed by the event, so that its repeats make one dead letter. A republish by
        # `weft dlq reprocess` that fails again is another matter: under the event's key the
        # DLQ would drop it as a duplicate inside its window (and the reprocessed letter would
        # look done), so it becomes a dead letter of its own, keyed by the letter it came from.
        mid = message_id(trigger.event.source, trigger.event.id)
        again = msg.headers.get(REPROCESSED_FROM_HEADER)
        if again:
            mid = f"{mid}:reprocessed:{again}"
        if outcome.status == "unroutable":
            self.unroutable += 1
            return [DeadLetter.of(msg, "trigger_unroutable", outcome.reason, mid)]
        # Also for duplicates: if we crashed after the commit but before these were
        # published, the redelivery publishes them (same dedup ids).
        return rejected_letters(outcome, msg.data, source_subject=msg.subject, key=mid, headers=msg.headers,
                                delivered=msg.delivered)

    async def _give_up_on_last_tries(self, msgs: list[Delivery], exc: Exception, delay: float) -> None:
        """The broker drops a message after max_deliver tries: dead-letter it ourselves first."""
        for msg in msgs:
            try:
                if msg.delivered >= self.max_deliver:
                    self.failed += 1
                    letter = DeadLetter.of(msg, "trigger_failed", f"could not be ingested: {type(exc).__name__}: {exc}",
                                           message_key(TRIGGERS_STREAM, msg.stream_seq))
                    await self.transport.dead_letter_many([letter])
                    _log_letters([letter])
                    await msg.ack()
                else:
                    await msg.nak(delay=delay)
            except Exception:  # the broker is away too: ack_wait brings them back
                log.debug("triggers: could not settle message %s", msg.stream_seq, exc_info=True)


def _log_letters(letters: list[DeadLetter]) -> None:
    # One line per kind and batch: a burst of bad events must not become a burst of log lines
    # too (each dead letter is in the DLQ with its reason).
    kinds: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        kinds.setdefault(letter.kind, []).append(letter)
    for kind, some in kinds.items():
        log.warning("%d trigger(s) dead-lettered (%s), the first: %s", len(some), kind, " ".join(some[0].reason.split())[:300])
