"""The execution application service: load state, call the pure core, append.

Everything that changes an execution (the result consumer, the CLI, the
gateway) goes through here, so every change is a decided event appended with
optimistic concurrency: if two writers race, one gets ConcurrencyError,
reloads and decides again. A command is never published from here: the relay
publishes what is in the store, so if it is not stored it did not happen.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from contracts import events as ev
from contracts.definitions import Problem, validate_input
from contracts.messages import StepResult
from contracts.payloads import PayloadError, PayloadLimits, is_ref
from services.orchestrator.decide import Command, DecisionError, Reprocess, Start, UnknownTask, decide_into
from services.orchestrator.registry import Version
from services.orchestrator.state import Execution, evolve
from services.payloads import Claims
from services.store import ConcurrencyError, EventStore, NewEvent

_TRIGGER_NS = uuid.UUID("0d5f3e55-8a1c-4c3b-a3a4-1f6c2b7d9e21")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class InputError(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("invalid input:\n" + "\n".join(f"  {p}" for p in problems))


class NotFound(LookupError):
    pass


def execution_id_for(workflow: str, key: str) -> str:
    """A deterministic execution id: the same key always names the same execution,
    so starting twice with one idempotency key (or one trigger event) starts once,
    forever, not only inside a broker's dedup window."""
    return str(uuid.uuid5(_TRIGGER_NS, f"{workflow}\x00{key}"))


@dataclass(slots=True)
class Outcome:
    message_id: str
    status: str  # applied | duplicate | unknown
    execution_id: str
    reason: str = ""


class Executions:
    def __init__(self, store: EventStore, clock: Callable[[], datetime] = utcnow, cache_size: int = 20_000,
                 limits: PayloadLimits | None = None):
        self.store = store
        self.clock = clock
        # Every event is measured before it is appended: one over the inline limit has its
        # payload stored in the blob store and carries a reference (decide() stays pure).
        self.claims = Claims.on(store, limits)
        self._cache: OrderedDict[str, Execution] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the consumer thread and request threads share the cache
        self.listeners: list[Callable[[], None]] = []  # told after every append (wakes the relay)
        # The executions the last apply_results finished, which it no longer caches (for its metrics).
        self.finished_in_batch: dict[str, Execution] = {}

    # ---- reading -------------------------------------------------------------------------

    def load(self, execution_id: str, *, fresh: bool = False) -> Execution:
        """State of an execution, from the cache topped up with newer events."""
        cached = None if fresh else self._copy(execution_id)
        state = cached if cached is not None else Execution(id=execution_id)
        before = state.version
        for rec in self.store.load(uuid.UUID(execution_id), after_version=state.version):
            evolve(state, ev.decode(rec.type, rec.data))
        if state.version != before:
            # A copy of its own goes into the cache: the result consumer changes cached states
            # in place (`_take`), and the caller's must not change under it.
            self._remember(state.copy())
        return state

    def history(self, execution_id: str) -> list[Any]:
        return [ev.decode(r.type, r.data) for r in self.store.load(uuid.UUID(execution_id))]

    def cached(self, execution_id: str) -> Execution | None:
        """The cached state, without a read (may trail the store; only for a cheap first look)."""
        return self._get(execution_id)

    def _get(self, execution_id: str) -> Execution | None:
        """The cached state itself, to read (in the result consumer's thread) and never change."""
        with self._lock:
            return self._cache.get(execution_id)

    def _peek(self, execution_id: str) -> Execution | None:
        """`_get`, or the state of an execution the last result batch finished (no longer cached)."""
        return self._get(execution_id) or self.finished_in_batch.get(execution_id)

    def _copy(self, execution_id: str) -> Execution | None:
        # Copied under the lock: the result consumer takes a state out (`_take`) before it
        # changes it in place, so no copy is ever made of a state being changed.
        with self._lock:
            cached = self._cache.get(execution_id)
            return cached.copy() if cached is not None else None

    def _take(self, execution_id: str) -> Execution | None:
        """The cached state, out of the cache: the caller changes it in place and puts it back
        with `_remember` once what it decided is stored (or drops it)."""
        with self._lock:
            return self._cache.pop(execution_id, None)

    def _forget(self, execution_id: str) -> None:
        with self._lock:
            self._cache.pop(execution_id, None)

    def _remember(self, state: Execution) -> None:
        with self._lock:
            cached = self._cache.get(state.id)
            if cached is not None and cached.version > state.version:
                return  # a reader that loaded before a batch's commit must not put back an older state
            self._cache[state.id] = state
            self._cache.move_to_end(state.id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    # ---- writing -------------------------------------------------------------------------

    def start(
        self, version: Version, input: Any, *, execution_id: str | None = None, trigger: dict | None = None,
        replay_of: str | None = None, reused: dict[str, Any] | None = None, idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> tuple[Execution, bool]:
        """Start an execution; returns (state, created). Input is checked before anything is stored."""
        self.check_input(version, input)
        if execution_id is None:
            execution_id = (
                execution_id_for(version.name, idempotency_key) if idempotency_key else str(uuid.uuid4())
            )
        cmd = start_command(version, input, trigger=trigger, replay_of=replay_of, reused=reused or {},
                            idempotency_key=idempotency_key, trace_id=trace_id)
        [out] = self.apply([Change(execution_id, cmd)])
        if out.error is not None:
            raise out.error
        assert out.state is not None
        return out.state, out.status == "applied"

    def check_input(self, version: Version, input: Any, where: str = "the execution input", prefix: str = "") -> None:
        """PayloadTooLarge or InputError before anything is stored."""
        self.claims.check(input, where)
        problems = validate_input(version.definition, input)
        if problems:
            for p in problems:
                p.path = f"{prefix}{p.path}"
            raise InputError(problems)

    def start_many(self, version: Version, inputs: Sequence[Any], *, execution_ids: Sequence[str] | None = None) -> list[str]:
        """Start many executions of one version in one transaction (bulk starts, backfills).

        Every input is checked first; nothing is stored if any is invalid. With
        given ids an execution that already exists is left alone (idempotent).
        """
        for i, data in enumerate(inputs):
            self.check_input(version, data, f"the execution input [{i}]", f"[{i}].")
        ids = list(execution_ids) if execution_ids is not None else [str(uuid.uuid4()) for _ in inputs]
        for out in self.apply([Change(eid, start_command(version, data)) for eid, data in zip(ids, inputs)]):
            if out.error is not None:
                raise out.error
        return ids

    def command(self, execution_id: str, cmd: Command, *, attempts: int = 20) -> list[Any]:
        """Decide and append a control command, retrying on a concurrent write."""
        [out] = self.apply([Change(execution_id, cmd)], attempts=attempts)
        if out.status == "not_found":
            raise NotFound(f"no execution {execution_id}")
        if out.error is not None:
            raise out.error
        return out.events

    # ---- the one writer ------------------------------------------------------------------

    def apply(self, changes: Sequence[Change], *, attempts: int = 20, cache: bool = True) -> list[Applied]:
        """Turn commands into events and store them: THE way execution events get into the store.

        All changes are decided and appended in one transaction, with their riders
        (records of other streams: a trigger's log entry, a dead letter's audit) so
        neither is ever stored without the other. One contention policy: when the
        store refuses the batch, the changes whose streams collided are settled
        (a start that collides already exists; a lone command is decided again on
        a fresh load; a change with riders, or in a group, is reported `conflict`
        for its caller, which knows what its riders mean) and the rest are tried
        together again. One wake-up of the relay per stored batch.

        `cache=False`: do not keep the new states (trigger ingestion: thousands of starts a
        second whose states this process may never read again would only feed the cache and
        the garbage collector's walks; measured in bench/triggers.py).
        """
        out: list[Applied | None] = [None] * len(changes)
        pending = list(range(len(changes)))
        fresh: set[str] = set()
        for _ in range(attempts):
            if not pending:
                break
            staged = self._decide(changes, pending, out, fresh)
            records = [r for s in staged for r in s.records]
            inbox = [m for s in staged for m in s.inbox]
            if not records and not inbox:
                self._settle(staged, out, cache)
                pending = []
                break
            try:
                self.store.append(records, inbox=inbox)
            except ConcurrencyError as exc:
                pending = self._contended(changes, staged, exc, out, fresh)
                continue
            self._settle(staged, out, cache)
            self._notify()
            pending = []
        for i in pending:  # still contended after every attempt
            out[i] = Applied(changes[i], "conflict", reason=f"execution {changes[i].execution_id}: too much contention",
                             error=ConcurrencyError(f"execution {changes[i].execution_id}: too much contention",
                                                    kind="version"))
        return [o if o is not None else Applied(c, "unchanged") for o, c in zip(out, changes)]

    def _decide(self, changes: Sequence[Change], pending: list[int], out: list[Applied | None],
                fresh: set[str]) -> list[_Group]:
        now = self.clock()
        self._warm([changes[i].execution_id for i in pending
                    if changes[i].command is not None and not isinstance(changes[i].command, Start)
                    and changes[i].execution_id not in fresh])
        states: dict[str, Execution] = {}
        groups: dict[Any, _Group] = {}
        for i in pending:  # decided in order: two changes of one execution chain on its state
            c = changes[i]
            g = groups.setdefault(("solo", i) if c.group is None else ("group", c.group), _Group())
            g.members.append(i)
            if c.command is None:  # riders alone (a trigger that starts nothing, a dead letter's audit)
                g.applied[i] = Applied(c, "applied")
                continue
            eid = c.execution_id
            state = states.get(eid)
            if state is None:
                if isinstance(c.command, Start):
                    state = Execution(id=eid)  # no read: appending version 1 wins or proves it exists
                else:
                    try:
                        state = self.load(eid, fresh=eid in fresh)  # the caller's own copy
                    except ValueError:
                        g.applied[i] = Applied(c, "not_found", reason="execution id is not a UUID")
                        continue
                states[eid] = state
            if not state.version and not isinstance(c.command, Start):
                g.applied[i] = Applied(c, "not_found", reason=f"no execution {eid}")
                continue
            version = state.version
            # What to go back to if the core raises halfway (it may have folded some events in).
            before = state.copy() if version else None  # a start goes back to nothing
            try:
                if isinstance(c.command, Reprocess) and c.command.patch is not None:
                    _patchable(state, c.command)
                events = decide_into(state, c.command, now)
            except Exception as exc:  # noqa: BLE001 - one bad command must not sink the batch
                states[eid] = before if before is not None else Execution(id=eid)
                g.applied[i] = Applied(c, "failed", reason=str(exc), error=exc)
                continue
            g.applied[i] = Applied(c, "applied" if events else "unchanged", events=events, state=state)
            if events:
                encoded, moved = self.claims.offload(events)
                g.records.extend(_record(eid, version + n + 1, e, b) for n, (e, b) in enumerate(encoded))
                if moved:  # the state as stored holds references where payloads were moved
                    g.moved.add(eid)
                    stored = before if before is not None else Execution(id=eid)
                    for e, _b in encoded:
                        evolve(stored, e)
                    states[eid] = g.applied[i].state = stored
        for g in groups.values():
            for i in g.members:
                riders = changes[i].riders
                if callable(riders):
                    riders = riders([g.applied[j] for j in g.members])
                if g.applied[i].status == "applied" and riders:
                    g.records.extend(riders)
                    g.riders.update(r.stream_id for r in riders)
                if g.applied[i].status in ("applied", "unchanged"):
                    g.inbox.extend(changes[i].inbox)
        return list(groups.values())

    def _settle(self, staged: list[_Group], out: list[Applied | None], cache: bool = True) -> None:
        finals: dict[str, Execution] = {}
        moved: set[str] = set()
        for g in staged:
            for i in g.members:
                out[i] = g.applied[i]
                a = g.applied[i]
                if a.state is not None and a.status == "applied":
                    finals[a.state.id] = a.state
            moved |= g.moved
        for eid, state in finals.items():
            if not cache:
                self._forget(eid)  # what the cache held of it is now behind
            elif eid in moved:  # the working copy holds payloads the store has as references
                self._forget(eid)
            else:
                # A copy of its own: the result consumer changes cached states in place (`_take`),
                # and the caller reads this one.
                self._remember(state.copy())

    def _contended(self, changes: Sequence[Change], staged: list[_Group], exc: ConcurrencyError,
                   out: list[Applied | None], fresh: set[str]) -> list[int]:
        bad = set(exc.stream_ids)
        if exc.kind == "inbox":  # the streams are not at fault: a message was recorded meanwhile
            bad = set()
        pending: list[int] = []
        for g in staged:
            streams = {r.stream_id for r in g.records}
            if bad and not streams & bad:
                pending.extend(g.members)  # not at fault: tried again with the others
                continue
            for i in g.members:
                self._forget(changes[i].execution_id)
                fresh.add(changes[i].execution_id)
            solo = len(g.members) == 1 and not g.riders
            i = g.members[0]
            if solo and isinstance(changes[i].command, Start):
                state = self.load(changes[i].execution_id, fresh=True)
                if state.version:
                    out[i] = Applied(changes[i], "exists", state=state)
                else:  # the store named no streams: this one was not what collided
                    pending.append(i)
            elif solo and len(streams) > 0:
                pending.append(i)  # a lone command: decided again on a fresh load
            else:
                for j in g.members:
                    out[j] = Applied(changes[j], "conflict", collided=frozenset(streams & bad if bad else streams),
                                     reason="a concurrent write to the same streams")
        return pending

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    # ---- the result consumer's batch path ------------------------------------------------

    def apply_results(self, results: Sequence[StepResult]) -> list[Outcome]:
        """Apply a batch of step results in one transaction, with inbox dedup.

        If any execution in the batch was changed by someone else meanwhile, the
        whole transaction is refused; we then fall back to one execution at a time.
        """
        self.finished_in_batch = {}
        seen = self.store.seen([r.message_id for r in results])
        self._warm([r.execution_id for r in results])
        outcomes: list[Outcome] = []
        recheck: list[StepResult] = []
        staged: dict[str, _Staged] = {}
        # An error out of here leaves the states taken out of the cache out of it: half-decided,
        # they are loaded again next time.
        for r in results:
            mid = r.message_id
            if mid in seen:
                outcomes.append(Outcome(mid, "duplicate", r.execution_id))
                continue
            seen.add(mid)
            entry = staged.get(r.execution_id)
            if entry is None:
                # Trust the cache: if another writer moved this execution on, the
                # append below fails on its version and we fall back to fresh loads.
                # The cached state is worked on in place, not copied (a copy is O(tasks):
                # per batch, that made a map of 10,000 items quadratic); it is out of the
                # cache until the append succeeds, and dropped if it fails.
                base = self._take(r.execution_id) or Execution(id=r.execution_id)
                entry = staged[r.execution_id] = _Staged(base.version, base)
            if not entry.state.version:
                recheck.append(r)
                continue
            try:
                # UnknownTask is raised before anything is folded into the working copy;
                # any other error abandons the whole batch (nothing acked, all redelivered).
                events = decide_into(entry.state, r, self.clock())
            except UnknownTask:
                recheck.append(r)  # our cached state may be behind: decide again on a fresh load
                continue
            entry.events.extend(events)
            entry.inbox.append(mid)
            outcomes.append(Outcome(mid, "applied", r.execution_id))
        batch = [s for s in staged.values() if s.inbox]
        for s in staged.values():
            if not s.inbox and s.state.version:  # untouched (its results were unknown tasks): back in
                self._remember(s.state)
        if batch:
            records = []
            for s in batch:
                encoded, s.moved = self.claims.offload(s.events)
                records.extend(_record(s.state.id, s.base_version + i + 1, e, b) for i, (e, b) in enumerate(encoded))
            batch_ids = {m for s in batch for m in s.inbox}
            try:
                self.store.append(records, inbox=list(batch_ids))
            except ConcurrencyError:
                for s in batch:
                    self._forget(s.state.id)
                outcomes = [o for o in outcomes if o.message_id not in batch_ids]
                recheck = [r for r in results if r.message_id in batch_ids] + recheck
            else:
                for s in batch:
                    # Not kept: a state whose working copy holds payloads the store has as references,
                    # and a finished execution (results for it are rare now), so that what the cache
                    # holds follows the executions in flight, not the last `cache_size` ever run.
                    if s.moved or s.state.finished:
                        self._forget(s.state.id)
                        self.finished_in_batch[s.state.id] = s.state
                    else:
                        self._remember(s.state)
                self._notify()
        if recheck:
            outcomes += self._apply_one_by_one(recheck)
        return outcomes

    def _warm(self, execution_ids: Sequence[str]) -> None:
        """Load the executions a batch needs that are not cached, in one round trip."""
        missing = []
        for eid in dict.fromkeys(execution_ids):
            if self._get(eid) is not None:
                continue
            try:
                missing.append(uuid.UUID(eid))
            except ValueError:
                continue  # not an execution id: reported as unknown
        if not missing:
            return
        for sid, records in self.store.load_many(missing).items():
            if records:
                state = Execution(id=str(sid))
                for rec in records:
                    evolve(state, ev.decode(rec.type, rec.data))
                self._remember(state)

    def _apply_one_by_one(self, results: Sequence[StepResult]) -> list[Outcome]:
        """The batch was refused: each result through `apply`, the one writer, with its inbox id."""
        outcomes = []
        for r in results:
            for _ in range(20):
                if self.store.seen([r.message_id]):
                    outcomes.append(Outcome(r.message_id, "duplicate", r.execution_id))
                    break
                [a] = self.apply([Change(r.execution_id, r, inbox=[r.message_id])], attempts=1)
                if a.status in ("applied", "unchanged"):
                    outcomes.append(Outcome(r.message_id, "applied", r.execution_id))
                elif a.status == "not_found":
                    why = a.reason if "UUID" in a.reason else "no such execution"
                    outcomes.append(Outcome(r.message_id, "unknown", r.execution_id, why))
                elif isinstance(a.error, UnknownTask):
                    outcomes.append(Outcome(r.message_id, "unknown", r.execution_id, str(a.error)))
                elif a.status == "failed" and a.error is not None:
                    raise a.error  # the whole batch is abandoned: nothing acked, all redelivered
                else:
                    continue  # written meanwhile: seen, or decided again on a fresh load
                break
            else:
                raise ConcurrencyError(f"execution {r.execution_id}: too much contention", kind="version")
        return outcomes


@dataclass(slots=True)
class Change:
    """A command for one execution, and what must be stored with it.

    `riders` are records of other streams (a trigger's log entry, a dead letter's
    audit) stored in the same transaction when the command decides something (or
    always, when there is no command); a callable gets the group's outcomes and
    returns them. Changes with the same `group` are stored together or not at all.
    """

    execution_id: str
    command: Any  # a decide.Command (Start, Cancel, Reprocess, ...) or None: riders only
    riders: Sequence[NewEvent] | Callable[[Sequence[Applied]], Sequence[NewEvent]] = ()
    group: Any = None
    inbox: Sequence[str] = ()  # message ids recorded with it (a step result's), even when nothing is decided


@dataclass(slots=True)
class Applied:
    """What became of a change: applied | unchanged (the core decided nothing) | exists (a start
    whose execution was there already) | not_found | failed (the core refused: `error`) |
    conflict (its streams were written meanwhile: `collided`; nothing of it was stored)."""

    change: Change
    status: str
    events: list[Any] = field(default_factory=list)
    state: Execution | None = None
    reason: str = ""
    error: Exception | None = None
    collided: frozenset[uuid.UUID] = frozenset()


@dataclass(slots=True)
class _Group:
    members: list[int] = field(default_factory=list)
    applied: dict[int, Applied] = field(default_factory=dict)
    records: list[NewEvent] = field(default_factory=list)
    riders: set[uuid.UUID] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)
    inbox: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Staged:
    """One execution's share of a result batch: its working copy and what to append."""

    base_version: int
    state: Execution
    events: list[Any] = field(default_factory=list)
    inbox: list[str] = field(default_factory=list)
    moved: bool = False  # some payload went to the blob store


def start_command(version: Version, input: Any, **kw: Any) -> Start:
    return Start(definition=version.definition, version=version.version, content_hash=version.content_hash,
                 input=input, **kw)


def _record(execution_id: str, version: int, event: Any, data: bytes | None = None) -> NewEvent:
    return NewEvent(uuid.UUID(execution_id), version, event.type, ev.encode(event) if data is None else data)


def _patchable(state: Execution, cmd: Reprocess) -> None:
    # A merge patch is applied by the pure core, which does not load stored payloads: onto a
    # reference it would merge into the reference itself. Refused, with what to do instead.
    step = state.steps.get(cmd.step_id)
    task = step.tasks.get(cmd.item) if step is not None else None
    if task is not None and is_ref(task.input):
        raise DecisionError("input_by_reference", f"step {cmd.step_id!r}'s input is stored by reference (over the "
                            "inline limit, WEFT_PAYLOAD_INLINE_LIMIT): it cannot be patched; reprocess it without "
                            "a patch, or replay the execution with a new input")


__all__ = ["Applied", "Change", "Executions", "start_command", "InputError", "NotFound", "DecisionError", "Outcome", "PayloadError", "execution_id_for", "utcnow"]
