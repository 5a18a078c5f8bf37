"""`/v1/deadletters`: list (or cluster), show, reprocess, discard, stats.

Thin HTTP wrappers over services.deadletters, which `weft dlq` uses too. Every
read brings the view up to date first (`refresh`), so a dead letter is listed
right after its failure. Reprocess and discard act on open dead letters named by
id (or a unique prefix) or chosen by a filter, store each act as an event with
the caller's key as its actor, and answer one outcome per dead letter; doing it
again gives `already_*` outcomes and stores nothing.

A key bound to some workflows sees and acts on the dead letters of those
workflows only (a message dead letter about no known workflow is not theirs).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from contracts import deadletters as dl
from services.deadletters.actions import Actions, PatchError, detail
from services.deadletters.bulk import batches, chunked, parse_when, run_batches
from services.deadletters.view import stats as dead_letter_stats
from services.deadletters.view import (
    Filters, find, group_by_error, kind_problem, list_dead_letters,
)
from services.gateway.auth import ScopedRoute, caller, scoped, who
from services.gateway.errors import ApiError, errors, invalid
from services.gateway.keys import ApiKey
from services.gateway.models import DeadLetterActions, DeadLetterDetail, DeadLetterPage, DeadLetterStats, ErrorClusters

router = APIRouter(prefix="/v1/deadletters", tags=["dead letters"], route_class=ScopedRoute)
MAX_SELECTED = 10_000  # dead letters one reprocess or discard may act on (and one clustering may group)
MAX_IDS = 1000
_REF = re.compile(r"[0-9a-fA-F-]{1,64}")
_SUMMARY = ("id", "kind", "status", "source", "workflow", "execution_id", "step_id", "item", "attempt", "error_type",
            "error_message", "reason", "delivered", "source_subject", "first_seen", "last_seen", "actor",
            "action_reason", "acted_at")


def _text(value: Any) -> Any:
    """Text the store and the views can hold (PostgreSQL refuses NUL in text columns)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid UTF-8 text") from None
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
    return value


class _Filter(BaseModel):
    workflow: str | None = Field(None, min_length=1, max_length=128)
    step: str | None = Field(None, min_length=1, max_length=128, description="step id")
    kind: str | None = Field(None, min_length=1, max_length=64,
                             description=f"a kind ({', '.join(dl.STEP_KINDS + dl.MESSAGE_KINDS)}), or step / message")
    status: Literal["open", "reprocessed", "discarded", "all"] = "open"
    since: str | None = Field(None, min_length=1, max_length=64,
                              description="seen at or after: an ISO time, or an age like 30m, 2h, 7d")
    until: str | None = Field(None, min_length=1, max_length=64, description="seen before: an ISO time, or an age")
    error_contains: str | None = Field(None, min_length=1, max_length=500,
                                       description="in the error type or message, any case")

    @field_validator("*")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        return _text(value)


class ListQuery(_Filter):
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=100_000)
    group_by: Literal["error"] | None = Field(None, description="error: clusters of the same failure instead of rows")


class FilterBody(_Filter):
    model_config = ConfigDict(extra="forbid")


Ref = Annotated[str, Field(min_length=1, max_length=64)]


class _Act(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[Ref] | None = Field(None, min_length=1, max_length=MAX_IDS, description="dead letter ids or unique prefixes")
    filter: FilterBody | None = Field(None, description="or: the dead letters this selects (open ones by default)")
    dry_run: bool = False


class ReprocessRequest(_Act):
    patch: dict[str, Any] | None = Field(None, description="RFC 7386 merge patch of a step's input or a message's payload")
    why: str | None = Field(None, max_length=2000, description="recorded with the reprocess")

    @field_validator("why")
    @classmethod
    def _why(cls, value: str | None) -> str | None:
        return _text(value)

    @field_validator("patch")
    @classmethod
    def _patch(cls, value: Any) -> Any:
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError as exc:
            raise ValueError(f"cannot be stored as JSON: {exc}") from None
        return value


class DiscardRequest(_Act):
    reason: str = Field(max_length=2000, description="why (required); recorded with who did it")

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("say why these are discarded (it is recorded with your key)")
        return _text(value.strip())


# ---- reading ------------------------------------------------------------------------------------


def _refresh(request: Request) -> Any:
    ctx = request.app.state.ctx
    ctx.dead_letters.refresh()
    return ctx.store


def _when(where: str, name: str, text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return parse_when(text)
    except (ValueError, OverflowError):
        raise invalid(f"{where}.{name}", f"{text!r} is neither an ISO time (2024-05-01T12:00:00Z) nor an age "
                                         "(30m, 2h, 7d)") from None


def _filters(tx: Any, key: ApiKey, f: _Filter, where: str) -> list[Filters]:
    """The view's filters for `f`: one, or for a key bound to workflows and naming none, one per workflow."""
    problem = kind_problem(tx, f.kind)
    if problem:
        raise invalid(f"{where}.kind", problem)
    common = dict(step=f.step, kind=f.kind, status=None if f.status == "all" else f.status,
                  since=_when(where, "since", f.since), until=_when(where, "until", f.until),
                  error_contains=f.error_contains)
    if f.workflow is not None and not key.can_use(f.workflow):
        raise ApiError(403, f"this key may not see the dead letters of workflow {f.workflow!r}")
    workflows = [f.workflow] if f.workflow is not None or key.workflows is None else sorted(key.workflows)
    return [Filters(workflow=w, **common) for w in workflows]


def _page(tx: Any, filters: list[Filters], limit: int, offset: int) -> list[dict[str, Any]]:
    """Newest first; over several filters, each one's first offset+limit rows merged."""
    if len(filters) == 1:
        return list_dead_letters(tx, filters[0], limit=limit, offset=offset)
    rows = [r for f in filters for r in list_dead_letters(tx, f, limit=offset + limit)]
    return sorted(rows, key=lambda r: r["seq"], reverse=True)[offset : offset + limit]


def _scan(tx: Any, filters: list[Filters], cap: int) -> tuple[list[dict[str, Any]], bool]:
    """Every matching row up to `cap`, oldest first, and whether there were more."""
    rows = sorted((r for f in filters for r in list_dead_letters(tx, f, limit=cap + 1, oldest_first=True)),
                  key=lambda r: r["seq"])
    return rows[:cap], len(rows) > cap


def _resolve(tx: Any, key: ApiKey, ref: str, field: str) -> dict[str, Any]:
    found = [r for r in find(tx, ref) if key.can_use(r.get("workflow"))] if _REF.fullmatch(ref) else []
    if not found:
        raise ApiError(404, f"no dead letter {ref!r}", problems=[{"field": field, "message": "no such dead letter"}])
    if len(found) > 1:
        message = f"{ref!r} is ambiguous: it starts {', '.join(r['id'] for r in found)}; give more characters"
        raise ApiError(422, f"{field}: {message}", code="ambiguous", problems=[{"field": field, "message": message}])
    return found[0]


@router.get("", response_model=DeadLetterPage | ErrorClusters, responses=errors(), openapi_extra=scoped("read"))
def list_(request: Request, q: Annotated[ListQuery, Query()]) -> Any:
    """Dead letters, newest first (open ones unless `status` says otherwise); with `group_by=error`,
    clusters of the same failure (over at most 10000 dead letters)."""
    twice = next((k for k in request.query_params if len(request.query_params.getlist(k)) > 1), None)
    if twice is not None:  # a filter given twice is not two filters: say so rather than use one of them
        raise invalid(f"query.{twice}", "give it once")
    store = _refresh(request)
    with store.reader() as tx:
        filters = _filters(tx, caller(request), q, "query")
        if q.group_by == "error":
            rows, more = _scan(tx, filters, MAX_SELECTED)
            return {"groups": group_by_error(rows)[q.offset : q.offset + q.limit], "truncated": more}
        rows = _page(tx, filters, q.limit + 1, q.offset)
    nxt = q.offset + q.limit if len(rows) > q.limit else None
    return {"items": [{k: r.get(k) for k in _SUMMARY} for r in rows[: q.limit]], "next_offset": nxt}


@router.get("/stats", response_model=DeadLetterStats, responses=errors(), openapi_extra=scoped("read"))
def stats(request: Request) -> Any:
    """Open dead letters by kind and workflow (the `weft.dlq.open` metric), and totals by status
    (for a key bound to workflows: of those workflows)."""
    store = _refresh(request)
    key = caller(request)
    with store.reader() as tx:
        return dead_letter_stats(tx, None if key.workflows is None else sorted(key.workflows))


@router.get("/{dead_letter_id}", response_model=DeadLetterDetail, responses=errors(404), openapi_extra=scoped("read"))
def show(request: Request, dead_letter_id: str = Path(max_length=64, description="an id or a unique prefix")) -> Any:
    """One dead letter: its payload, error and traceback, the execution's history around the failure,
    and what was done about it."""
    store = _refresh(request)
    with store.reader() as tx:
        row = _resolve(tx, caller(request), dead_letter_id, "path.dead_letter_id")
    return detail(store, row)


# ---- acting -------------------------------------------------------------------------------------


def _selection(request: Request, body: _Act) -> list[dict[str, Any]]:
    """The dead letters a request names (ids) or selects (filter), oldest first."""
    if body.ids is not None and body.filter is not None:
        raise invalid("body.filter", "give ids or a filter, not both")
    if body.ids is None and body.filter is None:
        raise invalid("body.ids", "which dead letters? give ids, or a filter (an empty one selects every open one)")
    store = _refresh(request)
    key = caller(request)
    with store.reader() as tx:
        if body.ids is not None:
            rows = {}
            for i, ref in enumerate(body.ids):
                row = _resolve(tx, key, ref, f"body.ids.{i}")
                rows[row["id"]] = row
            return list(rows.values())
        assert body.filter is not None
        selected, more = _scan(tx, _filters(tx, key, body.filter, "body.filter"), MAX_SELECTED)
    if more:
        raise invalid("body.filter", f"it selects more than {MAX_SELECTED} dead letters; narrow it (e.g. since, until)")
    return selected


def _answer(outcomes: list[Any], dry_run: bool) -> dict[str, Any]:
    return {"ok": all(o.ok for o in outcomes), "dry_run": dry_run,
            "counts": dict(Counter(o.outcome for o in outcomes)), "outcomes": [o.as_dict() for o in outcomes]}


@router.post("/reprocess", response_model=DeadLetterActions, responses=errors(404), openapi_extra=scoped("admin"))
async def reprocess(request: Request, body: ReprocessRequest) -> Any:
    """Push dead letters through again: a new attempt of a step (its execution reopens), or a republish
    of a message to where it came from; patched if asked (every patch is checked before anything is
    stored). Steps go 100 to a transaction. Sending the same request again does nothing new."""
    ctx = request.app.state.ctx
    actions = Actions(ctx.store, ctx.transport, executions=ctx.executions)

    def checked() -> list[dict[str, Any]]:
        rows = _selection(request, body)
        for row in rows:
            try:
                actions.patched(row, body.patch)
            except PatchError as exc:
                raise invalid("body.patch", f"for dead letter {row['id']}: {exc}") from None
        return rows

    rows = await asyncio.to_thread(checked)
    by = who(caller(request))

    async def act(chunk: list[dict[str, Any]]) -> list[Any]:
        if chunk[0]["source"] == "step":
            return await asyncio.to_thread(actions.reprocess_steps, chunk, body.patch, by, body.why, body.dry_run)
        return [await actions.reprocess(chunk[0], patch=body.patch, by=by, why=body.why, dry_run=body.dry_run)]

    return _answer(await run_batches(batches(rows), act, cancelled=ctx.stop), body.dry_run)


@router.post("/discard", response_model=DeadLetterActions, responses=errors(404), openapi_extra=scoped("admin"))
async def discard(request: Request, body: DiscardRequest) -> Any:
    """Give up on dead letters, saying why (recorded with the caller's key); their executions stay as they are."""
    ctx = request.app.state.ctx
    rows = await asyncio.to_thread(_selection, request, body)
    actions, by = Actions(ctx.store, executions=ctx.executions), who(caller(request))

    async def act(chunk: list[dict[str, Any]]) -> list[Any]:
        return await asyncio.to_thread(actions.discard_many, chunk, by=by, why=body.reason, dry_run=body.dry_run)

    return _answer(await run_batches(chunked(rows), act, cancelled=ctx.stop), body.dry_run)
