"""The claim check in the I/O shell: measure values, store the large ones, resolve references.

`contracts.payloads` says what the policy is; this applies it with a blob store
(`services.store.blobs`). Used by every entrance (through `Executions.start`), by the
orchestrator before it appends events, by the worker around a step, and by the
dead-letter path. Blocking (the blob store is); async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from contracts import events as ev
from contracts.payloads import (
    MARKER,
    PayloadLimits,
    PayloadTooLarge,
    encode,
    is_ref,
    make_ref,
    measure,
    ref_digest,
    refs_in,
    replace_refs,
)
from services.store import EventStore
from services.store.blobs import BlobStore, SqlBlobStore, digest_of

# Fields of events that hold payloads: what is moved to the blob store when an event is
# over the inline limit. Anything else in an event is bounded by its own rules.
_PAYLOAD_FIELDS = {
    "ExecutionStarted": ("input",),
    "StepScheduled": ("input",),
    "StepSucceeded": ("output",),
    "ExecutionCompleted": ("output",),
}
_SMALL = 1024  # a payload field this small stays in an oversized event: moving it would not help


class Claims:
    """The payload policy with a blob store behind it."""

    def __init__(self, blobs: BlobStore, limits: PayloadLimits | None = None):
        self.blobs = blobs
        self.limits = limits or PayloadLimits()

    @classmethod
    def on(cls, store: EventStore, limits: PayloadLimits | None = None) -> Claims:
        return cls(SqlBlobStore(store), limits)

    # ---- entrances ---------------------------------------------------------------------

    def check(self, value: Any, what: str) -> bytes:
        """Refuse a value from outside over the maximum (PayloadTooLarge) or holding the
        reserved reference key; returns its encoding."""
        return measure(value, self.limits, what)

    # ---- storing -----------------------------------------------------------------------

    def store(self, value: Any, data: bytes | None = None) -> Any:
        """`value` itself if it is small, else a reference to it, stored."""
        if data is None:
            data = encode(value)
        if len(data) <= self.limits.inline:
            return value
        return make_ref(self.blobs.put(data), len(data))

    def store_output(self, value: Any, what: str = "the step's output", data: bytes | None = None) -> Any:
        """A step's output: over the maximum it is refused (PayloadTooLarge), over the inline
        limit it is stored and a reference is returned. `data`: its encoding, if already made."""
        if data is None:
            data = encode(value, what)
        if len(data) <= self.limits.inline:
            return value
        self.limits.check(what, len(data))
        return make_ref(self.blobs.put(data), len(data))

    def offload(self, events: Sequence[Any]) -> tuple[list[tuple[Any, bytes]], bool]:
        """Events with their encodings, each over the inline limit with its payload fields
        stored and replaced by references; and whether any was changed."""
        out: list[tuple[Any, bytes]] = []
        changed = False
        inline = self.limits.inline
        for event in events:
            data = ev.encode(event)
            if len(data) > inline and event.type in _PAYLOAD_FIELDS:
                event, data = self._offload_one(event, data)
                changed = True
            out.append((event, data))
        return out, changed

    def _offload_one(self, event: Any, data: bytes) -> tuple[Any, bytes]:
        update: dict[str, Any] = {}
        for name in _PAYLOAD_FIELDS[event.type]:
            value = getattr(event, name)
            if value is None or is_ref(value):
                continue
            encoded = encode(value)
            if len(encoded) > _SMALL:
                update[name] = make_ref(self.blobs.put(encoded), len(encoded))
        if event.type == "ExecutionStarted" and event.reused:
            update["reused"] = {k: self._moved(v) for k, v in event.reused.items()}
        if not update:
            return event, data
        event = event.model_copy(update=update)
        return event, ev.encode(event)

    def _moved(self, value: Any) -> Any:
        if is_ref(value):
            return value
        encoded = encode(value)
        return make_ref(self.blobs.put(encoded), len(encoded)) if len(encoded) > _SMALL else value

    # ---- resolving ---------------------------------------------------------------------

    def load(self, digest: str) -> Any:
        return orjson.loads(self.blobs.get(digest))

    def resolve(self, value: Any) -> Any:
        """`value` with every reference in it replaced by the stored value."""
        digests = refs_in(value)
        if not digests:
            return value
        loaded = {d: self.load(d) for d in dict.fromkeys(digests)}
        return replace_refs(value, loaded.__getitem__)

    def same(self, stored: Any, given: Any) -> bool:
        """Whether a value as stored (maybe a reference) is the value given (a repeated request)."""
        if is_ref(stored) and not is_ref(given):
            data = encode(given)
            return make_ref(digest_of(data), len(data)) == stored
        return bool(stored == given)


def has_refs(data: bytes) -> bool:
    """Whether encoded JSON holds a reference (a substring test, no parse)."""
    return MARKER in data


__all__ = ["Claims", "PayloadTooLarge", "has_refs", "ref_digest"]
