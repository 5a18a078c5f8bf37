"""NATS JetStream side of the MaxDeliver capture (the `MessageArchive` of ingest.py).

JetStream publishes a MaxDeliver advisory on core NATS
(`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`), which is
at-most-once: a subscriber that is down misses it. A stream that captures those
subjects for this namespace's streams makes them durable, so the capture reads
them with an ordinary durable consumer. The abandoned message itself is read by
its stream sequence and, once dead-lettered, deleted from its work queue
(`NatsTransport.get_message` / `delete_message`).
"""

from __future__ import annotations

from nats.js import api

from contracts.subjects import DLQ_STREAM, STREAMS
from services.broker.nats import NatsTransport
from services.deadletters.ingest import SourceMessage

ADVISORY_STREAM = "WEFT_ADVISORIES"
ADVISORY_MAX_AGE = 7 * 24 * 3600.0


class NatsArchive:
    advisory_stream = ADVISORY_STREAM

    def __init__(self, transport: NatsTransport):
        self.transport = transport
        # The DLQ's own consumer never gives up (max_deliver -1), and dead-lettering
        # a dead letter would only loop.
        self._sources = {transport.stream_name(s): s for s in STREAMS if s != DLQ_STREAM}

    @staticmethod
    def supports(transport: object) -> bool:
        return isinstance(transport, NatsTransport)

    def subjects(self) -> list[str]:
        return [f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{physical}.*" for physical in sorted(self._sources)]

    async def ensure(self) -> None:
        t = self.transport
        await t.ensure_stream(api.StreamConfig(
            name=t.stream_name(ADVISORY_STREAM),
            description="weft MaxDeliver advisories" + (f" (namespace {t.namespace})" if t.namespace else ""),
            subjects=self.subjects(), retention=api.RetentionPolicy.LIMITS, storage=api.StorageType.FILE,
            max_age=ADVISORY_MAX_AGE, discard=api.DiscardPolicy.OLD,
        ))

    def logical_stream(self, physical: str) -> str | None:
        return self._sources.get(physical)

    async def get(self, logical_stream: str, seq: int) -> SourceMessage | None:
        msg = await self.transport.get_message(logical_stream, seq)
        return None if msg is None else SourceMessage(subject=msg.subject, data=msg.data, headers=msg.headers)

    async def delete(self, logical_stream: str, seq: int) -> None:
        await self.transport.delete_message(logical_stream, seq)
