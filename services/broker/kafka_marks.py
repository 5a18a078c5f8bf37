"""Delivery counts of the Kafka consumer that survive the process (`DeliveryMarks`).

Kafka keeps one committed offset per partition, not a delivery count per record, and Tansu drops
commit metadata. Without a durable count, a record that kills every process handling it (SIGKILL,
segfault, out of memory) comes back at `delivered = 1` each time and the crash guard
(`services.broker.redelivery`) can never call it poison.

So before the consumer hands records out, it writes the counts of the records it has out: one
marks topic per consumer group (`<group>.deliveries`), partitioned like the source topic, marks
partition p holding snapshots for source partition p. A snapshot is the whole set of
`offset -> delivered` of the records handed out and not settled in that partition (so at most
max_ack_pending entries, usually a handful), which makes three things cheap and simple:

- Writing is one produce per partition per fetch, awaited before the records are handed out.
- Reading back, when a partition is assigned, is one record: the last of marks partition p.
- Pruning is implicit: a settled (or committed) record is not in the next snapshot, and the topic
  is compacted on one key per partition, so Kafka keeps only the last snapshot of each.

Only the partition's owner writes its snapshots; the group's rebalance revokes before it assigns,
so a new owner reads what the old one wrote last (a dead one wrote nothing after it died).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import ConsumerStoppedError, KafkaError

from services.broker.ports import BrokerError

if TYPE_CHECKING:
    from services.broker.kafka import KafkaTransport

log = logging.getLogger("services.broker.kafka")
SNAPSHOT_KEY = b"deliveries"  # one key per marks partition: compaction keeps only the last snapshot
READ_BACK_FOR = 10.0  # seconds to read the last snapshot of a partition when it is assigned


def marks_topic(group_id: str) -> str:
    return f"{group_id}.deliveries"


class DeliveryMarks:
    """The durable delivery counts of one consumer group on one topic (see the module docstring)."""

    def __init__(self, transport: KafkaTransport, source_topic: str, group_id: str) -> None:
        self._transport, self.source_topic = transport, source_topic
        self.topic = marks_topic(group_id)
        self._reader: AIOKafkaConsumer | None = None
        self.writes = 0

    async def start(self) -> None:
        producer = self._transport._producer_()
        partitions = len(await producer.partitions_for(self.source_topic))
        admin = AIOKafkaAdminClient(bootstrap_servers=self._transport.servers)
        try:
            await admin.start()
            if self.topic not in set(await admin.list_topics()):
                response = await admin.create_topics([NewTopic(self.topic, partitions, 1,
                                                               topic_configs={"cleanup.policy": "compact"})])
                for topic, code, *rest in getattr(response, "topic_errors", []):
                    if code not in (0, 36):  # 36: another member made it first
                        raise BrokerError(f"cannot create topic: error {code} {rest[0] if rest else ''}",
                                          operation="consumer", stream=topic)
        finally:
            try:
                await admin.close()
            except (KafkaError, OSError) as exc:
                log.debug("kafka: closing admin: %s", exc)
        self._reader = AIOKafkaConsumer(bootstrap_servers=self._transport.servers, enable_auto_commit=False,
                                        group_id=None, fetch_max_wait_ms=self._transport.fetch_wait_ms)
        await self._reader.start()

    async def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            try:
                await reader.stop()
            except (KafkaError, OSError) as exc:
                log.debug("kafka: stopping marks reader: %s", exc)

    async def write(self, partition: int, counts: dict[int, int]) -> None:
        """Record `counts` (offset -> delivered) as what partition `partition` has out. Raises
        BrokerError when it cannot: the caller must then not hand the records out."""
        value = orjson.dumps({str(o): n for o, n in counts.items()})
        await self._transport._retrying(
            "mark deliveries", lambda: self._transport._producer_().send_and_wait(
                self.topic, value, key=SNAPSHOT_KEY, partition=partition))
        self.writes += 1

    async def read(self, partitions: list[int]) -> dict[int, dict[int, int]]:
        """The last snapshot of each partition: {partition: {offset: delivered}}. A partition whose
        snapshot cannot be read in READ_BACK_FOR counts from 0 (logged): the consumer goes on."""
        out: dict[int, dict[int, int]] = {}
        reader = self._reader
        if reader is None or not partitions:
            return out
        tps = [TopicPartition(self.topic, p) for p in partitions]
        try:
            reader.assign(tps)
            ends = await reader.end_offsets(tps)
            wanted = {tp: end - 1 for tp, end in ends.items() if end > 0}
            for tp, last in wanted.items():
                reader.seek(tp, last)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + READ_BACK_FOR
            while wanted and loop.time() < deadline:
                batches = await reader.getmany(*wanted, timeout_ms=200)
                for tp, records in batches.items():
                    for r in records:
                        if tp in wanted and r.offset >= wanted[tp]:
                            out[tp.partition] = {int(o): int(n) for o, n in orjson.loads(r.value or b"{}").items()}
                            del wanted[tp]
            if wanted:
                log.warning("kafka: could not read delivery marks of %s partitions %s in time",
                            self.source_topic, sorted(tp.partition for tp in wanted))
        except (KafkaError, ConsumerStoppedError, OSError, ValueError) as exc:
            log.warning("kafka: reading delivery marks of %s: %s: %s", self.source_topic, type(exc).__name__, exc)
        return out
