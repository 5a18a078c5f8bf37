"""API keys: created and revoked as events in the store, looked up by their prefix.

A key reads `weft_<prefix>_<secret>`: an 8-hex-digit prefix, shown in clear
in listings and logs, and 256 random bits. The store keeps only the SHA-256
digest of the whole key, in an `ApiKeyCreated` event at version 1 of the
stream named by the prefix; revoking appends `ApiKeyRevoked`. So:
  - authenticating is one point read of one short stream (cached for a couple
    of seconds), with no projection or extra table to keep up, which also
    works for `weft gateway` running alone;
  - every creation and revocation is an auditable, immutable event;
  - a plain SHA-256 is enough: with 256 bits of entropy a brute force is
    hopeless without a slow hash, which would only cost latency per request.

Scopes: `read` (GET routes), `trigger` (publish triggers, start executions),
`admin` (publish workflows; cancel, pause, resume, retry; keys). `admin`
implies the other two. A key may be bound to a set of workflows: it then sees
and acts on those workflows and their executions only.

Trigger data belongs to event types, not to workflows, so a bound key is also
bound to event types (`weft keys create --workflows A --events 'order.*'`):
it may subscribe its workflows only to those types (and webhook paths, named
`webhook:/path`), and backfill only events of those types. Without `--events`
a bound key may use none. So a key bound to A can neither read B's recorded
events by backfilling A with B's type, nor receive B's live events by
publishing A with `on: [event: <B's type>]`. A pattern is a name, or a prefix
ending in `*` (`order.*`, `webhook:/shop/*`); `*` alone is every event type.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from contracts.definitions import NAME
from services.store import ConcurrencyError, EventStore, NewEvent

SCOPES = ("read", "trigger", "admin")
_IMPLIES = {"read": {"read"}, "trigger": {"trigger"}, "admin": {"read", "trigger", "admin"}}
_NS = uuid.UUID("9e8a1d43-5b0c-4f6e-8d27-3c1a7f5e2b90")
_TOKEN = re.compile(r"^weft_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(NAME)
_EVENT_PATTERN = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9_.:/\-]{0,199}\*?)$")
WEBHOOK_PREFIX = "webhook:"


class KeyProblem(ValueError):
    """Bad input to create/revoke (unknown scope, bad workflow name, unknown key)."""


class ApiKeyCreated(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["ApiKeyCreated"] = "ApiKeyCreated"
    schema_version: int = 1
    at: datetime
    key_id: str  # the prefix, in clear
    digest: str  # "sha256:<hex>" of the whole key
    scopes: list[str]
    workflows: list[str] | None = None  # None: every workflow
    name: str | None = None
    by: str | None = None
    events: list[str] | None = None  # event type patterns of a bound key; None: none (unbound: every one)


class ApiKeyRevoked(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["ApiKeyRevoked"] = "ApiKeyRevoked"
    schema_version: int = 1
    at: datetime
    key_id: str
    by: str | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    scopes: frozenset[str]
    workflows: frozenset[str] | None
    name: str | None
    created_at: datetime
    revoked_at: datetime | None = None
    digest: str = ""
    events: frozenset[str] | None = None

    def allows(self, scope: str) -> bool:
        return any(scope in _IMPLIES[s] for s in self.scopes if s in _IMPLIES)

    def can_use(self, workflow: str | None) -> bool:
        return self.workflows is None or workflow in self.workflows

    def can_use_event(self, name: str) -> bool:
        """May this key use trigger data named `name` (an event type, or `webhook:/path`)?"""
        if self.workflows is None:
            return True
        return any(event_matches(p, name) for p in self.events or ())

    def public(self) -> dict[str, Any]:
        return {
            "id": self.key_id, "prefix": f"weft_{self.key_id}", "scopes": sorted(self.scopes),
            "workflows": sorted(self.workflows) if self.workflows is not None else None, "name": self.name,
            "events": sorted(self.events) if self.events is not None else None,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "active": self.revoked_at is None,
        }


def event_matches(pattern: str, name: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern


def webhook_name(path: str) -> str:
    from services.triggers.routing import normalise_path

    return WEBHOOK_PREFIX + normalise_path(path)


def trigger_names(definition: object) -> list[str]:
    """What a definition subscribes to, as binding names: its event types and `webhook:/path`s."""
    names: list[str] = []
    for spec in getattr(definition, "on", None) or ():
        if getattr(spec, "event", None):
            names.append(spec.event)
        elif getattr(spec, "webhook", None) is not None:
            names.append(webhook_name(spec.webhook.path))
    return names


def recorded_name(event: dict[str, object]) -> str:
    """The binding name of a recorded trigger event (webhook deliveries by their path)."""
    from services.triggers.webhooks import WEBHOOK_EVENT_TYPE

    if event.get("type") == WEBHOOK_EVENT_TYPE:
        return webhook_name(str(event.get("subject") or ""))
    return str(event.get("type") or "")


def parse_events(values: Iterable[str]) -> list[str]:
    patterns = sorted({p.strip() for v in values for p in v.split(",") if p.strip()})
    bad = [p for p in patterns if not _EVENT_PATTERN.match(p)]
    if bad or not patterns:
        raise KeyProblem(f"events: not event type patterns (a type, a prefix ending in '*', or '*'): "
                         f"{bad or 'none given'}")
    if len(patterns) > 1000:
        raise KeyProblem("events: at most 1000 patterns")
    return patterns


def key_stream(key_id: str) -> uuid.UUID:
    return uuid.uuid5(_NS, f"apikey:{key_id}")


def _digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(values: Iterable[str]) -> list[str]:
    scopes = sorted({s.strip() for v in values for s in v.split(",") if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise KeyProblem(f"scopes: unknown {unknown} (known: {', '.join(SCOPES)})")
    if not scopes:
        raise KeyProblem(f"scopes: give at least one of {', '.join(SCOPES)}")
    return scopes


class Keys:
    def __init__(self, store: EventStore, *, clock: Callable[[], datetime] | None = None, cache_ttl: float = 2.0):
        self.store = store
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._lock = threading.Lock()

    def create(
        self, scopes: Iterable[str], *, workflows: Iterable[str] | None = None, name: str | None = None,
        by: str | None = None, events: Iterable[str] | None = None, token: str | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key: (the key itself, shown once; its record). With `token` (a deployment's
        bootstrap key, made outside and kept in a secret file) that key is recorded instead of
        a fresh one; recording the same token again changes nothing."""
        wanted = parse_scopes(scopes)
        bound = None
        if workflows is not None:
            bound = sorted({w.strip() for w in workflows if w.strip()})
            bad = [w for w in bound if not _NAME.match(w)]
            if bad or not bound:
                raise KeyProblem(f"workflows: not workflow names: {bad or 'none given'}")
        patterns = None
        if events is not None:
            if bound is None:
                raise KeyProblem("events: only a key bound to workflows takes an event binding "
                                 "(an unbound key reaches every event type)")
            patterns = parse_events(events)
        given = token
        if given is not None and not _TOKEN.match(given):
            raise KeyProblem("key: not a Weft key (weft_<8 hex digits>_<43 characters of base64url>)")
        for _ in range(10):
            if given is not None:
                key_id, token = given[5:13], given
            else:
                key_id = secrets.token_hex(4)
                token = f"weft_{key_id}_{secrets.token_urlsafe(32)}"
            event = ApiKeyCreated(at=self.clock(), key_id=key_id, digest=_digest(token), scopes=wanted,
                                  workflows=bound, name=name, by=by, events=patterns)
            try:
                self.store.append([NewEvent(key_stream(key_id), 1, event.type, orjson.dumps(event.model_dump(mode="json")))])
            except ConcurrencyError:
                if given is not None:
                    existing = self._fold(self._events(key_id))
                    if existing is not None and existing.digest == _digest(given):
                        return given, existing  # recorded before: a bootstrap run again
                    raise KeyProblem("key: its prefix is taken by another key") from None
                continue  # the prefix is taken (1 in 4 billion): draw again
            return token, self._fold([event])  # type: ignore[return-value]
        raise ConcurrencyError("could not find a free key prefix", kind="version")

    def revoke(self, key_id: str, *, by: str | None = None) -> ApiKey:
        key_id = key_id.removeprefix("weft_")[:8]
        for _ in range(10):
            events = self._events(key_id)
            key = self._fold(events)
            if key is None:
                raise KeyProblem(f"no API key {key_id!r}")
            if key.revoked_at is not None:
                return key
            event = ApiKeyRevoked(at=self.clock(), key_id=key_id, by=by)
            try:
                self.store.append([NewEvent(key_stream(key_id), len(events) + 1, event.type,
                                            orjson.dumps(event.model_dump(mode="json")))])
            except ConcurrencyError:
                continue
            with self._lock:
                self._cache.pop(key_id, None)
            return self._fold([*events, event])  # type: ignore[return-value]
        raise ConcurrencyError(f"key {key_id}: too much contention", kind="version")

    def list(self) -> list[ApiKey]:
        found: dict[str, list[ApiKeyCreated | ApiKeyRevoked]] = {}
        after = 0
        while True:
            batch = self.store.read(after, 1000, types=["ApiKeyCreated", "ApiKeyRevoked"])
            for rec in batch:
                e = _decode(rec.type, rec.data)
                found.setdefault(e.key_id, []).append(e)
            if len(batch) < 1000:
                break
            after = batch[-1].position
        keys = [k for k in (self._fold(evs) for evs in found.values()) if k is not None]
        return sorted(keys, key=lambda k: k.created_at)

    def get(self, key_id: str) -> ApiKey | None:
        return self._fold(self._events(key_id))

    def authenticate(self, token: str) -> ApiKey | None:
        """The active key this token is, or None."""
        m = _TOKEN.match(token.strip())
        if m is None:
            return None
        key_id = m.group(1)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key_id)
        if hit is None or hit[0] < now:
            key = self.get(key_id)
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[key_id] = (now + self.cache_ttl, key)
        else:
            key = hit[1]
        if key is None or key.revoked_at is not None:
            return None
        if not hmac.compare_digest(key.digest.encode(), _digest(token.strip()).encode()):
            return None
        return key

    def _events(self, key_id: str) -> list[ApiKeyCreated | ApiKeyRevoked]:
        return [_decode(r.type, r.data) for r in self.store.load(key_stream(key_id))]

    @staticmethod
    def _fold(events: list[ApiKeyCreated | ApiKeyRevoked]) -> ApiKey | None:
        key: ApiKey | None = None
        for e in events:
            if isinstance(e, ApiKeyCreated):
                key = ApiKey(e.key_id, frozenset(e.scopes), frozenset(e.workflows) if e.workflows is not None else None,
                             e.name, e.at, None, e.digest, frozenset(e.events) if e.events is not None else None)
            elif key is not None:
                key = ApiKey(key.key_id, key.scopes, key.workflows, key.name, key.created_at, e.at, key.digest,
                             key.events)
        return key


def _decode(type_name: str, data: bytes) -> ApiKeyCreated | ApiKeyRevoked:
    if type_name == "ApiKeyCreated":
        return ApiKeyCreated.model_validate_json(data)
    return ApiKeyRevoked.model_validate_json(data)
