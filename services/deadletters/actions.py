"""Acting on dead letters: reprocess and discard, each recorded as an event.

Reprocessing a step dead letter asks its execution for a new attempt
(`Reprocess` through the pure core, which appends `StepReprocessRequested` and
schedules the attempt with the same idempotency key; the execution reopens).
Reprocessing a message dead letter republishes it, patched if asked, to the
subject it came from. Either way a `DeadLetterReprocessed` goes into the dead
letter's own stream (for a step, in the same transaction as the execution's
events). Doing it twice gives one new attempt: the dead letter's stream says it
was done, and the core ignores a reprocess of a task no longer dead-lettered.
A reprocess or retry made on the execution directly counts too.

Patches are RFC 7386 merge patches, checked before anything is stored or
published (`PatchError`). Nothing here prints: the CLI and an HTTP API share it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from contracts import deadletters as dl
from contracts import events as ev
from contracts.messages import MessageError, decode_ready, decode_result
from contracts.subjects import RESULTS_PREFIX, STEPS_PREFIX, TRIGGERS_PREFIX, trigger_subject
from contracts.triggers import CloudEvent
from contracts.payloads import PayloadLimits, is_ref, make_ref
from services.broker.oversize import DLQ_PAYLOAD_INLINE, SHA256_HEADER, SIZE_HEADER, TRUNCATED_HEADER
from services.broker import OutMessage, Transport
from services.orchestrator.decide import Reprocess, merge_patch
from services.orchestrator.executions import Change, Executions, utcnow
from services.payloads import Claims
from services.store.blobs import SqlBlobStore
from services.store import ConcurrencyError, EventStore, NewEvent

MAX_INPUT_BYTES = 900_000  # a StepReady must still fit the broker's 1 MB message limit
PATCH_MAX = PayloadLimits().inline  # a patch is stored and travels inline


class PatchError(ValueError):
    """A patch that cannot apply to this dead letter; nothing was stored."""


@dataclass(slots=True)
class Outcome:
    id: str
    outcome: str  # reprocessed | republished | discarded | already_reprocessed | already_discarded
    #             | would_reprocess | would_republish | would_discard | failed | cancelled
    kind: str = ""
    execution_id: str | None = None
    step_id: str | None = None
    detail: str = ""
    attempt: int | None = None  # the new attempt a step reprocess scheduled
    preview: Any = None  # dry run: the input or payload that would go out
    ok: bool = True

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("id", "outcome", "kind", "execution_id", "step_id", "detail", "attempt")}
        if self.preview is not None:
            out["preview"] = self.preview
        return out


@dataclass
class Actions:
    store: EventStore  # read here; every write goes through `executions.apply`, the one writer
    transport: Transport | None = None  # only republishing needs the broker
    clock: Callable[[], datetime] = utcnow
    executions: Executions | None = None  # the stack's, so its appends wake the relay; else one of our own

    def __post_init__(self) -> None:
        if self.executions is None:
            self.executions = Executions(self.store, self.clock)

    @property
    def writer(self) -> Executions:
        assert self.executions is not None
        return self.executions

    # ---- checking ---------------------------------------------------------------------------

    def patched(self, row: dict[str, Any], patch: Any) -> Any:
        """What would go out with `patch` applied; PatchError when it cannot."""
        if patch is None:
            return None
        if not isinstance(patch, dict):
            raise PatchError(f"a patch must be a JSON object (an RFC 7386 merge patch), not {_json_type(patch)}")
        # A patch is stored inline in its event: it must fit the inline limit (a bigger change is a replay).
        size = len(orjson.dumps(patch))
        if size > PATCH_MAX:
            raise PatchError(f"the patch is {size} bytes, over the limit of {PATCH_MAX} bytes (a patch travels inline; "
                             "for a bigger change replay the execution with a new input)")
        if _truncated(row):
            raise PatchError("the payload was over the dead-letter limit and is kept whole in the blob store "
                             f"({(row.get('headers') or {}).get(SIZE_HEADER)} bytes): reprocess it unpatched or discard it")
        if row["source"] == "step":
            return _patched_step_input(row, patch)
        return _patched_message(row, patch)

    # ---- reprocess ------------------------------------------------------------------------------

    async def reprocess(self, row: dict[str, Any], *, patch: Any = None, by: str, why: str | None = None,
                        dry_run: bool = False) -> Outcome:
        """Reprocess one dead letter (a row of the view). Raises PatchError for a bad patch."""
        preview = self.patched(row, patch)
        if row["source"] == "step":
            [out] = await asyncio.to_thread(self.reprocess_steps, [row], patch, by, why, dry_run)
            return out
        return await self.republish(row, patch, by, why, dry_run, preview)

    def reprocess_steps(self, rows: Sequence[dict[str, Any]], patch: dict[str, Any] | None, by: str, why: str | None,
                        dry_run: bool = False) -> list[Outcome]:
        """Reprocess step dead letters: every execution's new attempt and every dead letter's
        `DeadLetterReprocessed` in one transaction, so there is no moment where one is stored
        without the other. A row whose streams someone wrote meanwhile is done again alone."""
        for _ in range(20):
            outcomes, conflicted = self._reprocess_steps(rows, patch, by, why, dry_run)
            if not conflicted:
                return outcomes
            if len(rows) > 1:
                again = {i: self.reprocess_steps([rows[i]], patch, by, why, dry_run)[0] for i in conflicted}
                return [again.get(i, o) for i, o in enumerate(outcomes)]
        raise ConcurrencyError("reprocess: too much contention", kind="version")

    def _reprocess_steps(self, rows: Sequence[dict[str, Any]], patch: dict[str, Any] | None, by: str,
                         why: str | None, dry_run: bool) -> tuple[list[Outcome], list[int]]:
        acts = self._load_many([r["id"] for r in rows])
        histories = self._load_many([r["execution_id"] for r in rows])
        changes: list[Change] = []
        asked: list[int] = []  # the row of each change
        outcomes: list[Outcome] = []
        now = self.clock()
        for n, row in enumerate(rows):
            out = Outcome(row["id"], "", row["kind"], row["execution_id"], row["step_id"])
            outcomes.append(out)
            done = [dl.decode(r.type, r.data) for r in acts[row["id"]]]
            status = dl.status_of(done)
            if status != dl.OPEN:
                _already(out, status, done)
                continue
            execution_id, step_id, item = row["execution_id"], row["step_id"], row["item"]
            history = histories[execution_id]
            handled = _handled_after(history, int(row["details"].get("execution_version") or 0), step_id, item)
            if handled is not None:
                out.outcome, out.detail = "already_reprocessed", f"{handled['type']} by {handled.get('by') or 'someone'}"
                continue
            if dry_run:
                out.outcome, out.detail = "would_reprocess", f"new attempt of {step_id}" + (f"#{item}" if item is not None else "")
                out.preview = self.patched(row, patch) if patch is not None else _json(row["payload"])
                continue
            audit = dl.DeadLetterReprocessed(
                at=now, dead_letter_id=row["id"], by=by, why=why, patch=patch, action="reprocess_step",
                execution_id=execution_id,
            )
            # Our request id rides on the event: the history then says who asked, and why. The audit
            # is stored only if the core schedules a new attempt, in the same transaction.
            cmd = Reprocess(step_id=step_id, item=item, patch=patch, by=by, why=why, request_id=row["id"])
            changes.append(Change(execution_id, cmd, riders=[
                NewEvent(uuid.UUID(row["id"]), len(done) + 1, audit.type, dl.encode(audit))]))
            asked.append(n)
        conflicted = []
        for n, a in zip(asked, self.writer.apply(changes) if changes else []):
            out = outcomes[n]
            if a.status == "applied":
                out.outcome = "reprocessed"
                out.attempt = next((e.attempt for e in a.events if e.type == "StepScheduled"
                                    and e.step_id == rows[n]["step_id"]), None)
            elif a.status == "unchanged":  # the core says there is nothing dead-lettered there any more
                out.outcome, out.detail = "already_reprocessed", "the step is no longer dead-lettered"
            elif a.status == "not_found":
                out.outcome, out.detail, out.ok = "failed", f"no execution {rows[n]['execution_id']}", False
            elif a.status == "failed":
                out.outcome, out.detail, out.ok = "failed", a.reason, False
            else:
                conflicted.append(n)
        return outcomes, conflicted

    def _load_many(self, ids: Sequence[str]) -> dict[str, list[Any]]:
        found = self.store.load_many([uuid.UUID(i) for i in dict.fromkeys(ids)])
        return {str(k): v for k, v in found.items()}

    async def republish(self, row: dict[str, Any], patch: dict[str, Any] | None, by: str, why: str | None,
                        dry_run: bool = False, preview: Any = None) -> Outcome:
        out = Outcome(row["id"], "", row["kind"], row.get("execution_id"), row.get("step_id"))
        acts = await asyncio.to_thread(self.acts, row["id"])
        status = dl.status_of(acts)
        if status != dl.OPEN:
            return _already(out, status, acts)
        data = orjson.dumps(preview) if patch is not None else dl.decode_payload(row["payload"], row["payload_encoding"])
        if patch is None and _truncated(row):  # the letter holds a preview: the message is in the blob store
            data = await asyncio.to_thread(self._whole, row)
        subject = target_subject(row, data)
        if not subject:
            out.outcome, out.ok = "failed", False
            out.detail = (f"it came from {row.get('source_subject') or 'nowhere known'}, not a broker subject it can be "
                          "republished to; it can only be discarded")
            return out
        msg_id = f"reprocess:{row['id']}"  # the broker drops a second republish within its window
        if dry_run:
            out.outcome, out.detail = "would_republish", f"to {subject}"
            out.preview = preview if patch is not None else _json(row["payload"]) if row["payload_encoding"] == "utf-8" else None
            return out
        if self.transport is None:
            raise RuntimeError("republishing a message needs the broker: no transport given")
        headers = {k: v for k, v in (row.get("headers") or {}).items()
                   if k not in (SIZE_HEADER, SHA256_HEADER, TRUNCATED_HEADER)}
        headers[dl.REPROCESSED_FROM_HEADER] = row["id"]
        if len(data) > DLQ_PAYLOAD_INLINE:
            try:
                data = await asyncio.to_thread(self._by_reference, row, data)
            except ValueError as exc:
                out.outcome, out.ok, out.detail = "failed", False, str(exc)
                return out
        # Publish before recording: a crash in between republishes once more (deduplicated
        # by msg id, and harmless downstream), where the other order could lose it.
        await self.transport.publish(OutMessage(subject=subject, data=data, msg_id=msg_id, headers=headers))
        event = dl.DeadLetterReprocessed(
            at=self.clock(), dead_letter_id=row["id"], by=by, why=why, patch=patch, action="republish",
            subject=subject, msg_id=msg_id,
        )
        out.detail = f"to {subject}"
        return await asyncio.to_thread(self._record, out, acts, event, "republished")

    def _whole(self, row: dict[str, Any]) -> bytes:
        return SqlBlobStore(self.store).get((row.get("headers") or {})[SHA256_HEADER])

    def _by_reference(self, row: dict[str, Any], data: bytes) -> bytes:
        """A big message to republish: a trigger goes with its data stored by reference (as
        POST /v1/triggers sends one); anything else of that size cannot travel and is refused."""
        if not row["kind"].startswith("trigger_"):
            raise ValueError(f"the message is {len(data)} bytes, too large to republish on the broker; discard it")
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ValueError(f"the message is {len(data)} bytes and not JSON; it cannot be republished") from None
        if not isinstance(event, dict) or "data" not in event:
            raise ValueError(f"the message is {len(data)} bytes and not a CloudEvent with data; discard it")
        claims = Claims.on(self.store)
        encoded = claims.check(event["data"], "the trigger's data")
        event["data"] = make_ref(claims.blobs.put(encoded), len(encoded))
        out = orjson.dumps(event)
        if len(out) > DLQ_PAYLOAD_INLINE:
            raise ValueError(f"the trigger is {len(out)} bytes without its data; too large to republish")
        return out

    # ---- discard --------------------------------------------------------------------------------

    def discard(self, row: dict[str, Any], *, by: str, why: str, dry_run: bool = False) -> Outcome:
        return self.discard_many([row], by=by, why=why, dry_run=dry_run)[0]

    def discard_many(self, rows: Sequence[dict[str, Any]], *, by: str, why: str, dry_run: bool = False) -> list[Outcome]:
        """Discard dead letters, all in one transaction (one at a time if something raced us)."""
        acts = self._load_many([r["id"] for r in rows])
        outcomes, records, now = [], [], self.clock()
        for row in rows:
            out = Outcome(row["id"], "", row["kind"], row.get("execution_id"), row.get("step_id"))
            outcomes.append(out)
            done = [dl.decode(r.type, r.data) for r in acts[row["id"]]]
            status = dl.status_of(done)
            if status == dl.DISCARDED:
                _already(out, status, done, "discard")
            elif status == dl.REPROCESSED or row["status"] == dl.REPROCESSED:
                out.outcome, out.ok, out.detail = "failed", False, "already reprocessed; nothing to discard"
            elif dry_run:
                out.outcome = "would_discard"
            else:
                event = dl.DeadLetterDiscarded(at=now, dead_letter_id=row["id"], by=by, why=why)
                records.append(NewEvent(uuid.UUID(row["id"]), len(done) + 1, event.type, dl.encode(event)))
                out.outcome = "discarded"
        if records:
            stored = self.writer.apply([Change("", None, riders=records, group=0)])
            if stored[0].status == "conflict":  # someone acted at the same moment: load again, one at a time
                return [o for row in rows for o in self.discard_many([row], by=by, why=why, dry_run=dry_run)]
        return outcomes

    def acts(self, dead_letter_id: str) -> list[Any]:
        """The dead letter's own stream, decoded: how it was recorded, and what was done about it."""
        return [dl.decode(r.type, r.data) for r in self.store.load(uuid.UUID(dead_letter_id))]

    def _record(self, out: Outcome, acts: list[Any], event: Any, outcome: str) -> Outcome:
        sid = uuid.UUID(out.id)
        for _ in range(20):
            [stored] = self.writer.apply([Change("", None, riders=[NewEvent(sid, len(acts) + 1, event.type, dl.encode(event))])])
            if stored.status == "applied":
                out.outcome = outcome
                return out
            if stored.status == "conflict":
                acts = self.acts(out.id)
                status = dl.status_of(acts)
                if status != dl.OPEN:  # someone else acted at the same moment
                    return _already(out, status, acts)
        raise ConcurrencyError(f"dead letter {out.id}: too much contention", kind="version")


def detail(store: EventStore, row: dict[str, Any]) -> dict[str, Any]:
    """One dead letter as `show` gives it: the row with its payload parsed when it is JSON
    text, the execution's history around the failure, and what was done about it."""
    payload: Any = row["payload"]
    if row["payload_encoding"] == "utf-8":
        payload = _json(payload)
    acts = [a.model_dump(mode="json") for a in Actions(store).acts(row["id"])]
    return {**row, "payload": payload, "history": history_around(store, row), "acts": acts}


def history_around(store: EventStore, row: dict[str, Any], before: int = 8, after: int = 4) -> list[dict[str, Any]]:
    """The execution's events around the failure (`seq` numbered like `weft history`); [] without one."""
    try:
        execution_id = uuid.UUID(row.get("execution_id") or "")
    except ValueError:
        return []
    rows = [{"seq": r.version, **ev.decode(r.type, r.data).model_dump(mode="json")} for r in store.load(execution_id)]
    if not rows:
        return []
    at = row["details"].get("execution_version")
    if at is None:  # a message: centre on the attempt it was about
        at = next((r["seq"] for r in reversed(rows) if r["type"] == "StepScheduled" and r.get("step_id") == row.get("step_id")
                   and r.get("attempt") == row.get("attempt")), len(rows))
    return [r for r in rows if at - before <= r["seq"] <= at + after]


def _handled_after(history: Sequence[Any], version: int, step_id: str, item: int | None) -> dict[str, Any] | None:
    """A reprocess or retry of this task after the dead-lettering at `version`, if any."""
    for rec in history:
        if rec.version <= version or rec.type not in ("StepReprocessRequested", "ExecutionRetried"):
            continue
        e = orjson.loads(rec.data)
        if rec.type == "ExecutionRetried" or (e.get("step_id") == step_id and e.get("item") == item):
            return {"type": rec.type, **e}
    return None


def target_subject(row: dict[str, Any], data: bytes) -> str | None:
    """Where a message goes back to: its own subject, or for a trigger that came by webhook
    or cron (no broker subject), the topic of its event type."""
    subject = row.get("source_subject") or ""
    if subject.startswith((STEPS_PREFIX + ".", RESULTS_PREFIX + ".", TRIGGERS_PREFIX + ".")):
        return subject
    if subject == TRIGGERS_PREFIX:  # the triggers topic itself: where a Kafka client that is not Weft wrote it
        return subject
    if row["kind"].startswith("trigger_"):
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if isinstance(event, dict) and isinstance(event.get("type"), str) and event["type"]:
            return trigger_subject(event["type"])
    return None


def _already(out: Outcome, status: str, acts: list[Any], acting: str = "reprocess") -> Outcome:
    last = next((a for a in reversed(acts) if a.type in ("DeadLetterReprocessed", "DeadLetterDiscarded")), None)
    if status == dl.DISCARDED:
        out.outcome = "already_discarded"
        out.detail = f"discarded by {last.by}: {last.why}" if last is not None else "discarded"
        # Reprocessing what a person threw away is refused, not silently skipped.
        out.ok = acting == "discard"
    else:
        out.outcome = "already_reprocessed"
        out.detail = f"by {last.by}" if last is not None else ""
    return out


def _truncated(row: dict[str, Any]) -> bool:
    return (row.get("headers") or {}).get(TRUNCATED_HEADER) == "stored"


def _json(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _patched_step_input(row: dict[str, Any], patch: dict[str, Any]) -> Any:
    if row["kind"] == "input_error":
        raise PatchError(
            f"step {row['step_id']!r} failed while computing its input (attempt 0), so there is no input to patch; "
            "reprocess without --patch after fixing what the input mapping reads"
        )
    current = _json(row["payload"])
    if is_ref(current):
        raise PatchError(f"the input of step {row['step_id']!r} is stored by reference (over the inline limit, "
                         f"{current.get('size')} bytes): it cannot be patched; reprocess it unpatched, or replay "
                         "the execution with a new input")
    if current is not None and not isinstance(current, dict):
        raise PatchError(
            f"the input of step {row['step_id']!r} is {_json_type(current)}; a merge patch applies to an object"
        )
    result = merge_patch(current, patch)
    size = len(orjson.dumps(result))
    if size > MAX_INPUT_BYTES:
        raise PatchError(f"the patched input is {size} bytes; at most {MAX_INPUT_BYTES} fit in a step message")
    problems = check_step_input(row["details"].get("step_type"), row["details"].get("config") or {}, result)
    if problems:
        raise PatchError(f"the patched input does not suit a {row['details'].get('step_type')} step: " + "; ".join(problems))
    return result


def check_step_input(step_type: str | None, config: dict[str, Any], value: Any) -> list[str]:
    """What can be checked of a built-in step type's input without running it."""
    problems: list[str] = []
    if step_type == "http" and isinstance(value, dict):
        for key in ("params", "headers"):
            if value.get(key) is not None and not isinstance(value[key], dict):
                problems.append(f"input.{key} must be an object, not {_json_type(value[key])}")
    elif step_type == "sleep" and "seconds" not in config:
        seconds = value.get("seconds") if isinstance(value, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            problems.append("input.seconds must be a number of seconds >= 0")
    return problems


def _patched_message(row: dict[str, Any], patch: dict[str, Any]) -> Any:
    if row["payload_encoding"] != "utf-8":
        raise PatchError("the payload is not text (it is stored base64); it cannot be merge-patched")
    try:
        body = orjson.loads(row["payload"])
    except orjson.JSONDecodeError:
        raise PatchError("the payload is not JSON, so a JSON merge patch cannot apply; reprocess it unpatched or discard it") from None
    if not isinstance(body, dict):
        raise PatchError(f"the payload is {_json_type(body)}; a merge patch applies to an object")
    result = merge_patch(body, patch)
    data = orjson.dumps(result)
    subject = row.get("source_subject") or ""
    # Patched means fixed: it must now be what its subject carries.
    try:
        if subject.startswith(RESULTS_PREFIX + "."):
            decode_result(data)
        elif subject.startswith(STEPS_PREFIX + "."):
            decode_ready(data)
        elif subject.startswith(TRIGGERS_PREFIX + ".") or row["kind"].startswith("trigger_"):
            CloudEvent.model_validate(result)
    except MessageError as exc:
        raise PatchError(f"the patched payload is still invalid: {exc}") from None
    except ValueError as exc:
        raise PatchError(f"the patched payload is still not a valid CloudEvent: {exc}") from None
    return result
