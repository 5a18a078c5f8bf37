"""Starting executions in bulk: one transaction for many starts, each with its own outcome.

`start_batch` is what `POST /v1/executions` and `POST /v1/executions:batch`
run: it resolves each item's workflow version, checks its input, and hands
every valid start to `Executions.apply` at once (one transaction, one relay
wake-up). `GroupCommit` is the request path's half: concurrent requests
queue their items, and one flush at a time stores whatever has queued
meanwhile, so N requests in flight cost about one commit, not N. No linger:
a lone request is flushed at once; batching comes only from requests that
arrive while a commit is under way.

Idempotency: an item's key names its execution (`execution_id_for`). The same
key with the same input answers with the execution it started (200); with a
different input, a conflict (409). That holds inside one batch too: the first
occurrence starts it, the others are repeats.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from contracts.payloads import PayloadError, PayloadTooLarge
from services.orchestrator.executions import Change, Executions, InputError, execution_id_for, start_command
from services.orchestrator.registry import Registry, UnknownWorkflow, Version
from services.orchestrator.state import Execution


@dataclass(slots=True)
class StartItem:
    workflow: str
    input: Any = None
    version: int | None = None
    idempotency_key: str | None = None
    trace_id: str | None = None


@dataclass(slots=True)
class Started:
    """One item's outcome, as an HTTP status: 201 started, 200 the key's existing execution
    (same input), 404 no such workflow or version, 409 the key started one with a different
    input, 413 input over the payload maximum, 422 invalid input, 503 contended (try again)."""

    status: int
    execution_id: str | None = None
    state: Execution | None = None
    code: str = ""
    message: str = ""
    problems: list[dict[str, str]] = field(default_factory=list)
    workflow: str = ""  # the version's name, for metrics


def start_batch(executions: Executions, registry: Registry, items: Sequence[StartItem], *,
                field_prefix: Callable[[int], str] = lambda i: "body.") -> list[Started]:
    """Start every valid item in one transaction; one outcome per item, in order."""
    out: list[Started | None] = [None] * len(items)
    versions: dict[tuple[str, int | None], Version | UnknownWorkflow] = {}
    changes: list[Change] = []
    asked: list[int] = []
    for i, item in enumerate(items):
        key = (item.workflow, item.version)
        if key not in versions:  # one read of a workflow's versions per batch, not per item
            try:
                versions[key] = registry.get(item.workflow, item.version)
            except UnknownWorkflow as exc:
                versions[key] = exc
        version = versions[key]
        if isinstance(version, UnknownWorkflow):
            out[i] = Started(404, code="not_found", message=str(version))
            continue
        prefix = field_prefix(i)
        try:
            executions.check_input(version, item.input, f"{prefix}input")
        except InputError as exc:
            out[i] = Started(422, code="invalid", message=str(exc), problems=[
                {"field": f"{prefix}{p.path}".rstrip("."), "message": p.message} for p in exc.problems])
            continue
        except PayloadTooLarge as exc:
            out[i] = Started(413, code="too_large", message=str(exc))
            continue
        except PayloadError as exc:
            out[i] = Started(422, code="invalid", message=str(exc))
            continue
        eid = (execution_id_for(version.name, item.idempotency_key) if item.idempotency_key
               else str(uuid.uuid4()))
        if item.idempotency_key and executions.cached(eid) is not None:
            # A repeat we know of: answered without a refused write, with its state topped up
            # from the store (another process may have moved it on since we cached it).
            out[i] = _repeat(executions, eid, executions.load(eid), item.input, version.name)
            continue
        changes.append(Change(eid, start_command(version, item.input, idempotency_key=item.idempotency_key,
                                                 trace_id=item.trace_id)))
        asked.append(i)
    for i, a in zip(asked, executions.apply(changes) if changes else []):
        item, eid = items[i], a.change.execution_id
        name = a.change.command.definition.name
        if a.status == "applied":
            out[i] = Started(201, eid, a.state, workflow=name)
        elif a.status in ("exists", "unchanged") and a.state is not None and a.state.version:
            out[i] = _repeat(executions, eid, a.state, item.input, name)
        elif a.status == "failed":
            out[i] = Started(422, code="cannot_start", message=a.reason)
        else:  # conflict: contended past every retry
            out[i] = Started(503, code="unavailable", message=a.reason or "too much contention; try again")
    return [o if o is not None else Started(500, code="internal", message="no outcome") for o in out]


def _repeat(executions: Executions, eid: str, state: Execution, data: Any, workflow: str) -> Started:
    if executions.claims.same(state.input, data):  # a big input is stored as a reference
        return Started(200, eid, state, workflow=workflow)
    return Started(409, eid, code="idempotency_conflict",
                   message="this idempotency key already started an execution with a different input")


class GroupCommit:
    """Queues starts from concurrent requests and stores each queue-full in one transaction.

    One flush runs at a time (in a thread: the store is blocking); items that arrive while
    it commits make the next flush. A request's own items are never split across flushes.
    """

    def __init__(self, flush: Callable[[list[StartItem]], list[Started]], *, max_items: int = 2000):
        self._flush = flush
        self._max = max_items
        self._queue: list[tuple[list[StartItem], asyncio.Future[list[Started]]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.flushes = 0  # for tests and benchmarks: how many transactions served how many requests
        self.requests = 0

    async def submit(self, items: list[StartItem]) -> list[Started]:
        fut: asyncio.Future[list[Started]] = asyncio.get_running_loop().create_future()
        self._queue.append((items, fut))
        self.requests += 1
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self._queue:
            taken, size = 0, 0
            for items, _ in self._queue:
                if taken and size + len(items) > self._max:
                    break
                taken, size = taken + 1, size + len(items)
            batch, self._queue = self._queue[:taken], self._queue[taken:]
            flat = [item for items, _ in batch for item in items]
            self.flushes += 1
            try:
                results = await asyncio.to_thread(self._flush, flat)
            except BaseException as exc:  # noqa: BLE001 - every waiter gets the store's error (503 and the like)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            n = 0
            for items, fut in batch:
                if not fut.done():
                    fut.set_result(results[n:n + len(items)])
                n += len(items)
