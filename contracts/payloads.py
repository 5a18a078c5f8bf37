"""The payload policy: how big a value may be, and the reference a large one travels as.

One policy for every entrance (CLI, HTTP, triggers, webhooks, cron, replays, dead-letter
reprocessing), for step inputs and outputs, and for what Weft publishes:

* up to `inline` bytes (of compact JSON), a value travels inside events and messages;
* between `inline` and `maximum`, it is stored once, content-addressed (SHA-256), in the
  blob store beside the events, and events and messages carry a small reference
  instead (the claim check): `{"$weft_blob": "<sha256 hex>", "size": <bytes>}`;
* over `maximum`, it is refused before anything is stored (`PayloadTooLarge`).

The reference key is reserved: a value that comes in from outside holding it is refused,
so a reference in a stored event is always one Weft made.

Pure: no I/O. The store of the bytes is `services.store.blobs`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jmespath.exceptions
import orjson

KIB = 1024
MIB = 1024 * 1024

REF_KEY = "$weft_blob"
# What a reference looks like inside compact JSON: a substring test on bytes already encoded
# tells "no reference in here" without walking the value (orjson never escapes these characters,
# and only a key is followed by ':', so a string value that happens to read "$weft_blob" is not one).
MARKER = b'"$weft_blob":'
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# The embedded NATS (`weft up`) and NATS's own default: 1 MiB per message, headers included.
BROKER_MAX_PAYLOAD = 1 * MIB
# Room kept for what travels around an inline value in one message: the StepReady or
# StepResult envelope, a step's `with` config, an error's message (4,000 chars) and
# traceback (8,000), and the headers (trace, message id, dead-letter reason up to 4 KiB).
ENVELOPE_ROOM = 256 * KIB


class PayloadError(ValueError):
    """Root error of the payload policy. Retrying the same value gives the same answer."""

    non_retryable = True


class PayloadTooLarge(PayloadError):
    """A value over a limit. `what` names it, `size` and `limit` are bytes of compact JSON."""

    def __init__(self, what: str, size: int, limit: int, setting: str = "WEFT_PAYLOAD_MAX"):
        super().__init__(f"{what} is {size} bytes ({human(size)}), over the limit of {limit} bytes "
                         f"({human(limit)}, {setting})")
        self.what, self.size, self.limit, self.setting = what, size, limit, setting


class ReservedKey(PayloadError):
    def __init__(self, what: str):
        super().__init__(f"{what} holds the key {REF_KEY!r}, which Weft reserves for references to stored payloads")
        self.what = what


class NotJson(PayloadError):
    def __init__(self, what: str, why: str):
        if "recursion" in why.lower():
            why = "nested too deeply (at most 254 levels)"
        super().__init__(f"{what} cannot be encoded as JSON: {why}")
        self.what = what


@dataclass(frozen=True, slots=True)
class PayloadLimits:
    """The two limits, in bytes of compact JSON. Built from settings at an entry point."""

    inline: int = 256 * KIB
    maximum: int = 64 * MIB

    def __post_init__(self) -> None:
        if self.inline < 1 * KIB:
            raise ValueError(f"payload inline limit {self.inline} is under 1 KiB")
        if self.inline > BROKER_MAX_PAYLOAD - ENVELOPE_ROOM:
            raise ValueError(f"payload inline limit {self.inline} leaves less than {human(ENVELOPE_ROOM)} of the "
                             f"broker's {human(BROKER_MAX_PAYLOAD)} for headers and envelope")
        if self.maximum < self.inline:
            raise ValueError(f"payload maximum {self.maximum} is under the inline limit {self.inline}")

    def check(self, what: str, size: int) -> None:
        if size > self.maximum:
            raise PayloadTooLarge(what, size, self.maximum)


def human(size: int) -> str:
    if size >= MIB:
        return f"{size / MIB:.1f} MiB"
    if size >= KIB:
        return f"{size / KIB:.1f} KiB"
    return f"{size} B"


def encode(value: Any, what: str = "the value") -> bytes:
    """The compact JSON a value is measured by (and stored as)."""
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise NotJson(what, str(exc)) from None


def measure(value: Any, limits: PayloadLimits, what: str) -> bytes:
    """Encode a value that comes in from outside and check it against the policy: over the
    maximum, or holding the reserved key, it is refused. Returns the encoding."""
    data = encode(value, what)
    limits.check(what, len(data))
    if MARKER in data:
        raise ReservedKey(what)
    return data


def make_ref(sha256: str, size: int) -> dict[str, Any]:
    return {REF_KEY: sha256, "size": size}


def is_ref(value: Any) -> bool:
    return isinstance(value, dict) and REF_KEY in value


def ref_digest(value: Any) -> str:
    """The SHA-256 of a reference, checked for shape."""
    digest = dict.get(value, REF_KEY) if isinstance(value, dict) else None  # dict.get: a Guarded refuses .get
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise PayloadError(f"not a payload reference: {str(value)[:200]}")
    return digest


def refs_in(value: Any) -> list[str]:
    """The digests of every reference inside a value (depth-first)."""
    found: list[str] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if REF_KEY in v:
                found.append(ref_digest(v))
            else:
                stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return found


def replace_refs(value: Any, resolve: Callable[[str], Any]) -> Any:
    """A copy of `value` with every reference replaced by `resolve(digest)`."""
    if isinstance(value, dict):
        if REF_KEY in value:
            return resolve(ref_digest(value))
        return {k: replace_refs(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_refs(v, resolve) for v in value]
    return value


class ReferencedValue(jmespath.exceptions.JMESPathError):
    """An expression looked inside a value that is stored by reference."""


class Guarded(dict):  # type: ignore[type-arg]
    """A reference as an expression sees it: it can be passed on whole, but looking inside it
    (a field, `*`, keys(), values()) is an error that says why, rather than a silent null.

    The orchestrator does not load large payloads to evaluate expressions over them: it would
    hold them in memory for every execution, and an expression's result is bounded anyway.
    Serialises as the plain reference (orjson and pydantic see a dict)."""

    __slots__ = ()

    def _refuse(self, *_: Any) -> Any:
        size = dict.get(self, "size")
        raise ReferencedValue(
            f"the value is stored by reference ({human(size) if isinstance(size, int) else '?'} over the inline "
            "limit, WEFT_PAYLOAD_INLINE_LIMIT): an expression can pass it on whole (e.g. "
            "${{ steps.<id>.output }}) but cannot look inside it; read it in a step, or have the step "
            "return the small fields you branch on separately")

    get = _refuse
    keys = _refuse
    values = _refuse
    items = _refuse


def guard(value: Any) -> Any:
    """`value` for an expression context: a reference (or a list holding some, a map step's
    outputs) guarded, anything else as it is."""
    if isinstance(value, dict):
        return Guarded(value) if REF_KEY in value and type(value) is not Guarded else value
    if isinstance(value, list) and value and any(isinstance(v, dict) and REF_KEY in v for v in value):
        return [guard(v) for v in value]
    return value
