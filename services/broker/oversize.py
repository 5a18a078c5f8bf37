"""Dead letters that fit the broker: an oversized poison message keeps a preview, its size
and SHA-256 in the dead letter, and its full bytes in the blob store.

A dead letter carries its source message's bytes plus headers (reason, source, count), so a
message near the broker's max_payload cannot be dead-lettered as it is: NATS closes the
connection on a publish over max_payload. Adapter-neutral (the Kafka adapter has the same
limit under another name): every transport passes its letters through `fit` first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence

from services.broker.ports import DeadLetter

log = logging.getLogger("weft.broker")

# Over this, a dead letter's payload is cut to a preview. Far under 1 MiB: the source
# message's own headers and the Weft-Dlq-* ones (reason up to 4 KiB) travel beside it.
DLQ_PAYLOAD_INLINE = 256 * 1024
PREVIEW_BYTES = 16 * 1024

# On a dead letter whose payload was cut (kept in the letter's headers, so `weft dlq show`
# and GET /v1/deadletters/{id} show them): the full size, its SHA-256 (the blob's key), and
# "stored" when the full bytes are in the blob store ("lost" only without one).
SIZE_HEADER = "Weft-Payload-Size"
SHA256_HEADER = "Weft-Payload-Sha256"
TRUNCATED_HEADER = "Weft-Payload-Truncated"

BlobSink = Callable[[bytes], str]  # stores bytes, returns their SHA-256 (services.store.blobs.BlobStore.put)


def preview(data: bytes, limit: int = PREVIEW_BYTES) -> bytes:
    """The first `limit` bytes, not cutting a UTF-8 character in two."""
    cut = data[:limit]
    back = 0
    while back < 3 and len(cut) > back and (cut[len(cut) - 1 - back] & 0xC0) == 0x80:
        back += 1
    if back and len(cut) > back and cut[len(cut) - 1 - back] >= 0xC0:
        cut = cut[: len(cut) - 1 - back]
    return cut


async def fit(letters: Sequence[DeadLetter], sink: BlobSink | None) -> list[DeadLetter]:
    out: list[DeadLetter] = []
    for letter in letters:
        if len(letter.payload) <= DLQ_PAYLOAD_INLINE:
            out.append(letter)
            continue
        digest = hashlib.sha256(letter.payload).hexdigest()
        kept = "lost"
        if sink is not None:
            stored = await asyncio.to_thread(sink, letter.payload)
            kept = "stored" if stored == digest else "lost"
        else:
            log.warning("a dead letter of %d bytes is cut to a preview and no blob store keeps its bytes",
                        len(letter.payload))
        headers = {**(letter.headers or {}), SIZE_HEADER: str(len(letter.payload)), SHA256_HEADER: digest,
                   TRUNCATED_HEADER: kept}
        out.append(dataclasses.replace(letter, payload=preview(letter.payload), headers=headers))
    return out
