"""Messages read, deleted and dead-lettered by the NATS adapter: a stream's message by its
sequence, and the dead-letter stream's writes. A mixin of `NatsTransport`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nats.js.errors

from services.broker.nats_errors import _no_such_message
from services.broker.nats_publish import MSG_ID_HEADER
from services.broker.letters import dead_letter_message
from services.broker.oversize import fit
from services.broker.ports import DeadLetter, OutMessage



@dataclass(slots=True, frozen=True)
class StoredMessage:
    """A message read from a stream by its sequence (`NatsTransport.get_message`)."""

    subject: str  # logical subject (namespace stripped)
    data: bytes
    headers: dict[str, str]  # the publisher's headers; the dedup id is in msg_id, not here
    msg_id: str | None
    stream_seq: int


class StoredMessages:
    """`NatsTransport`'s reads and deletes by sequence, and its dead letters."""

    # ---- stored messages, by sequence -------------------------------------

    async def get_message(self, stream: str, seq: int) -> StoredMessage | None:
        """The message at sequence `seq` of `stream` (a logical name), delivered or not;
        None when the stream holds none there (deleted, or acked off a work queue)."""
        if seq < 1:
            raise ValueError("seq must be >= 1")
        physical = self.stream_name(stream)

        async def get(_timeout: float) -> Any:
            try:
                return await self._js.get_msg(physical, seq=seq)
            except nats.js.errors.NotFoundError:
                return None

        raw = await self._retrying("get_message", "", get, stream=physical)
        if raw is None:
            return None
        headers = dict(raw.headers) if raw.headers else {}
        msg_id = headers.pop(MSG_ID_HEADER, None)
        return StoredMessage(
            subject=self.logical_subject(raw.subject or ""), data=raw.data or b"", headers=headers, msg_id=msg_id,
            stream_seq=seq,
        )

    async def delete_message(self, stream: str, seq: int) -> bool:
        """Remove the message at sequence `seq` from `stream` (a logical name), so no consumer
        gets it again. False when it was not there (already deleted, or acked off a work queue)."""
        physical = self.stream_name(stream)

        async def delete(_timeout: float) -> bool:
            try:
                return bool(await self._js.delete_msg(physical, seq))
            except nats.js.errors.APIError as exc:
                if _no_such_message(exc):
                    return False
                raise

        return await self._retrying("delete_message", "", delete, stream=physical)

    # ---- dead letters -----------------------------------------------------

    async def dead_letter(
        self,
        kind: str,
        payload: bytes,
        *,
        reason: str,
        headers: Mapping[str, str] | None = None,
        source_subject: str = "",
        delivered: int = 0,
        msg_id: str | None = None,
    ) -> None:
        """Store a dead letter. Pass the source message's identity (contracts.deadletters.message_key,
        or another stable id) as msg_id: it is the dead letter's dedup id, else one is derived from
        kind, source subject and payload."""
        [letter] = await fit([DeadLetter(
            kind, payload, reason, headers=headers, source_subject=source_subject, delivered=delivered, msg_id=msg_id,
        )], self.blob_sink)
        await self.publish(self._dead_letter_message(letter))

    async def dead_letter_many(self, letters: Sequence[DeadLetter]) -> None:
        """Store many dead letters in one atomic batch (one stored write); a batch holding one the
        stream has seen already (a redelivered poison message) goes message by message instead,
        and the broker drops that one as a duplicate."""
        fitted = await fit(letters, self.blob_sink)
        await self.publish_many([self._dead_letter_message(letter) for letter in fitted])

    @staticmethod
    def _dead_letter_message(letter: DeadLetter) -> OutMessage:
        return dead_letter_message(letter)
