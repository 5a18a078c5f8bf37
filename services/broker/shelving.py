"""Garbage off a work queue: into the DLQ in one write, then acked at its source.

The result consumer and the worker both meet messages they cannot decode (or,
for results, cannot place). The rule is the same for both: a message is acked
only once its dead letter is stored, so a crash in between means redelivery,
and the dead letter's id (the source message's identity) makes that harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from contracts.deadletters import message_key
from services.broker.ports import DeadLetter, Delivery, Transport
from services.faults import crash_point


async def shelve(
    transport: Transport, kind: str, stream: str, msgs: Sequence[tuple[Delivery, str]], *,
    crash: str, what: str, log: logging.Logger,
) -> None:
    """Dead-letter `msgs` (each with its reason) from the logical `stream`, then ack them.
    `crash` names the crash point between the two; `what` says what they are, for the log."""
    await transport.dead_letter_many([
        DeadLetter(kind, msg.data, reason, headers=msg.headers, source_subject=msg.subject,
                   delivered=msg.delivered, msg_id=message_key(stream, msg.stream_seq))
        for msg, reason in msgs
    ])
    crash_point(crash)  # stored in the DLQ, not yet acked: redelivery dedups
    for msg, _ in msgs:
        await msg.ack()
    # One line per batch: a flood of garbage must not become a flood of log lines too
    # (each dead letter is in the DLQ with its reason).
    log.warning("%d %s dead-lettered (%s), the first (#%d): %s",
                len(msgs), what, kind, msgs[0][0].stream_seq, " ".join(msgs[0][1].split())[:300])
