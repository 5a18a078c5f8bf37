"""A dead letter as the message that carries it onto the DLQ stream: one shape for every adapter,
so the ingester (services.deadletters.ingest) reads them all alike."""

from __future__ import annotations

import hashlib

from contracts import subjects as contract_subjects
from contracts.deadletters import DELIVERED_HEADER, KIND_HEADER, MSG_ID_HEADER, REASON_HEADER, SOURCE_SUBJECT_HEADER
from services.broker.ports import DeadLetter, OutMessage

REASON_MAX = 4096  # headers share the size limit with the body; a traceback must not crowd it out
_BROKER_HEADER_PREFIXES = ("nats-", "weft-kafka-")  # the broker's own (a copied Nats-Expected-Stream is refused)


def dead_letter_message(letter: DeadLetter) -> OutMessage:
    out = {k: v for k, v in (letter.headers or {}).items() if not k.lower().startswith(_BROKER_HEADER_PREFIXES)}
    out[REASON_HEADER] = letter.reason[:REASON_MAX]
    out[SOURCE_SUBJECT_HEADER] = letter.source_subject
    out[DELIVERED_HEADER] = str(letter.delivered)
    out[KIND_HEADER] = letter.kind
    if letter.msg_id:
        # The source message's identity is the dedup id as it is: whoever dead-letters that
        # message again (its redelivery, the MaxDeliver capture) stores nothing new.
        out[MSG_ID_HEADER] = dedup = letter.msg_id
    else:
        digest = hashlib.sha256(letter.source_subject.encode() + b"\0" + letter.payload).hexdigest()[:32]
        dedup = f"dlq:{letter.kind}:sha256:{digest}"
    return OutMessage(subject=contract_subjects.dlq_subject(letter.kind), data=letter.payload, msg_id=dedup, headers=out)
