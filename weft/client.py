"""A Python client of Weft's HTTP API, sync (`Client`) and async (`AsyncClient`).

    import weft

    with weft.Client("http://127.0.0.1:8080", api_key="wft_...") as client:
        run = client.start("order-fulfilment", input={"order_id": "A-1"}, idempotency_key="A-1")
        result = run.wait(timeout=30)      # .status, .output, .error

Responses are the gateway's own pydantic models (services.gateway.models), so
the client and the server share one copy of the schemas. Every error answer
becomes a `WeftError` subclass carrying the API's `code`, `message`,
`problems` and `status`. A 503 (store or broker unreachable) is retried with
exponential backoff, honouring `Retry-After`, up to `max_retries` times. The
default timeout (60 s) is longer than the gateway's own broker retries (30 s),
so a broker outage reaches the caller as a 503, not as a client timeout.
`wait` follows the execution's Server-Sent Events (`/v1/executions/{id}/events`),
reconnecting with `Last-Event-ID` if the stream breaks, until it finishes or
the timeout is over (`WaitTimeout`).
"""

from __future__ import annotations

import asyncio
import builtins  # the clients have a `list` method: inside them, `list[...]` is builtins.list
import os
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from services.gateway.models import (
    BatchStartOut,
    DeadLetterActions, DeadLetterDetail, DeadLetterPage, DeadLetterStats, ExecutionOut, ExecutionPage, HistoryEvent,
    TriggerOut, TriggerTypeList, WorkflowList, WorkflowVersionOut,
)
from weft.errors import (
    Conflict, Forbidden, InvalidRequest, NotFound, ServerError, TooLarge, Unauthorized, Unavailable, WaitTimeout,
    WeftError, error_of,
)
from weft.errors import retry_after as _retry_after

__all__ = ["Client", "AsyncClient", "Run", "AsyncRun", "WeftError", "Unauthorized", "Forbidden", "NotFound",
           "Conflict", "TooLarge", "InvalidRequest", "Unavailable", "ServerError", "WaitTimeout", "FINISHED"]

FINISHED = frozenset({"completed", "failed", "cancelled"})
_FINISHING = frozenset({"ExecutionCompleted", "ExecutionFailed", "ExecutionCancelled"})


# ---- what both clients share --------------------------------------------------------------------


def _default_url(url: str | None) -> str:
    """The URL given, else WEFT_URL, else the gateway `weft up` wrote into WEFT_HOME (./.weft)/stack.json."""
    if url:
        return url.rstrip("/")
    if os.environ.get("WEFT_URL"):
        return os.environ["WEFT_URL"].rstrip("/")
    stack = Path(os.environ.get("WEFT_HOME") or ".weft") / "stack.json"
    try:
        found = orjson.loads(stack.read_bytes()).get("gateway_url")
    except (OSError, ValueError):
        found = None
    if not found:
        raise ValueError("no gateway URL: pass one, set WEFT_URL, or run `weft up` (which writes .weft/stack.json)")
    return str(found).rstrip("/")


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("WEFT_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _backoff(attempt: int, retry_after: float | None, base: float, cap: float) -> float:
    if retry_after is not None:
        return min(retry_after, cap)
    return min(cap, base * 2 ** attempt) * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not security


def _definition_text(definition: Any) -> tuple[bytes, str]:
    """A Workflow, a WorkflowDef, a mapping, or YAML/JSON text -> (body, content type)."""
    if isinstance(definition, (str, bytes)):
        body = definition.encode() if isinstance(definition, str) else definition
        return body, "application/yaml"
    if hasattr(definition, "definition") and callable(definition.definition):  # a weft.Workflow
        definition = definition.definition()
    if hasattr(definition, "canonical"):
        definition = definition.canonical()
    return orjson.dumps(definition), "application/json"


def _control_body(why: str | None) -> dict[str, Any]:
    return {"why": why} if why is not None else {}


def _start_body(workflow: Any, input: Any, version: int | None) -> dict[str, Any]:
    """A workflow name or a weft.Workflow; an input that may be a pydantic model."""
    name = workflow if isinstance(workflow, str) else getattr(workflow, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"workflow must be a name or a weft.Workflow, not {type(workflow).__name__}")
    name, version = _named(name, version)
    return _drop_none(workflow=name, version=version, input=_json(input))


def _batch_body(items: Any) -> dict[str, Any]:
    """Items as mappings with `workflow` (a name or a weft.Workflow), `input`, and optionally
    `version` and `idempotency_key`."""
    out = []
    for item in items:
        body = _start_body(item["workflow"], item.get("input"), item.get("version"))
        if item.get("idempotency_key") is not None:
            body["idempotency_key"] = item["idempotency_key"]
        out.append(body)
    return {"items": out}


def _named(workflow: str, version: int | None) -> tuple[str, int | None]:
    """NAME or NAME@VERSION, as the CLI takes a workflow; a `version=` beside it must agree."""
    name, sep, number = workflow.partition("@")
    if not sep:
        return workflow, version
    if not name or not number.isdigit() or int(number) < 1:
        raise ValueError(f"workflow: expected NAME or NAME@VERSION, got {workflow!r}")
    if version is not None and int(version) != int(number):
        raise ValueError(f"workflow: {workflow!r} and version={version} disagree")
    return name, int(number)


def _json(value: Any) -> Any:
    if value is None:
        return {}
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _seg(value: Any) -> str:
    """One path segment: an id from elsewhere must not walk to another route (`x/../../keys`)."""
    text = str(value)
    if text in ("", ".", "..") or len(text) > 512:
        raise ValueError(f"not an id: {text[:80]!r}")
    return quote(text, safe="")


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class _Sse:
    """A minimal Server-Sent Events reader: fields of one event until a blank line."""

    def __init__(self) -> None:
        self.event: str = "message"
        self.id: str | None = None
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str | None, str] | None:
        if not line:
            if not self.data and self.event == "message":
                return None
            out = (self.event, self.id, "\n".join(self.data))
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None  # a comment: the keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = value
        return None


# ---- sync ---------------------------------------------------------------------------------------


class Run:
    """A started execution: `wait`, `get`, and its control commands."""

    def __init__(self, client: Client, execution: ExecutionOut):
        self.client, self.execution = client, execution
        self.id = execution.execution_id
        self.created = execution.created  # False: the Idempotency-Key named an existing execution

    def wait(self, timeout: float | None = None) -> ExecutionOut:
        return self.client.wait(self.id, timeout=timeout)

    def get(self) -> ExecutionOut:
        return self.client.get(self.id)

    def cancel(self, why: str | None = None) -> ExecutionOut:
        return self.client.cancel(self.id, why=why)

    def __repr__(self) -> str:
        return f"Run({self.id!r}, status={self.execution.status!r})"


class Client:
    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 0.2, max_backoff: float = 10.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = _default_url(url)
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.http = httpx.Client(base_url=self.url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One API call, retried on 503; an error answer raises its WeftError."""
        for attempt in range(self.max_retries + 1):
            response = self.http.request(method, path, **kw)
            if response.status_code < 400:
                return response
            if response.status_code != 503 or attempt == self.max_retries:
                raise error_of(response)
            time.sleep(_backoff(attempt, _retry_after(response), self.backoff, self.max_backoff))
        raise AssertionError("unreachable")

    # ---- workflows ----------------------------------------------------------------------------

    def publish_workflow(self, definition: Any) -> WorkflowVersionOut:
        """Register a version: a weft.Workflow, a WorkflowDef, a mapping, or YAML/JSON text."""
        body, media = _definition_text(definition)
        r = self.request("POST", "/v1/workflows", content=body, headers={"Content-Type": media})
        return WorkflowVersionOut.model_validate_json(r.content)

    def workflows(self) -> WorkflowList:
        return WorkflowList.model_validate_json(self.request("GET", "/v1/workflows").content)

    def workflow(self, name: str, version: int | None = None) -> WorkflowVersionOut:
        name, version = _named(name, version)  # NAME@VERSION too
        path = f"/v1/workflows/{_seg(name)}" + (f"/versions/{int(version)}" if version is not None else "")
        return WorkflowVersionOut.model_validate_json(self.request("GET", path).content)

    # ---- executions ---------------------------------------------------------------------------

    def start(self, workflow: Any, input: Any = None, *, version: int | None = None,
              idempotency_key: str | None = None) -> Run:
        body = _start_body(workflow, input, version)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self.request("POST", "/v1/executions", json=body, headers=headers)
        return Run(self, ExecutionOut.model_validate_json(r.content))

    def start_many(self, items: Any) -> BatchStartOut:
        """Start many executions in one request (at most services.gateway.models.MAX_BATCH).
        Each item gets its own outcome in `.items[i]` (`status` 201, 200 for its key's
        existing execution, or an error); a refused request raises and starts nothing."""
        r = self.request("POST", "/v1/executions:batch", json=_batch_body(items))
        return BatchStartOut.model_validate_json(r.content)

    def get(self, execution_id: str) -> ExecutionOut:
        return ExecutionOut.model_validate_json(self.request("GET", f"/v1/executions/{_seg(execution_id)}").content)

    def list(self, *, workflow: str | None = None, status: str | None = None, since: str | None = None,
             until: str | None = None, limit: int = 50, cursor: str | None = None) -> ExecutionPage:
        params = _drop_none(workflow=workflow, status=status, since=since, until=until, limit=limit, cursor=cursor)
        return ExecutionPage.model_validate_json(self.request("GET", "/v1/executions", params=params).content)

    def iter_executions(self, **filters: Any) -> Iterator[Any]:
        """Every execution the filters select, page after page (by cursor)."""
        cursor = None
        while True:
            page = self.list(**filters, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, execution_id: str, why: str | None = None) -> ExecutionOut:
        return self._control(execution_id, "cancel", why)

    def pause(self, execution_id: str, why: str | None = None) -> ExecutionOut:
        return self._control(execution_id, "pause", why)

    def resume(self, execution_id: str, why: str | None = None) -> ExecutionOut:
        return self._control(execution_id, "resume", why)

    def retry(self, execution_id: str, why: str | None = None) -> ExecutionOut:
        return self._control(execution_id, "retry", why)

    def _control(self, execution_id: str, command: str, why: str | None) -> ExecutionOut:
        r = self.request("POST", f"/v1/executions/{_seg(execution_id)}/{command}", json=_control_body(why))
        return ExecutionOut.model_validate_json(r.content)

    def history(self, execution_id: str, *, after: int = 0) -> builtins.list[HistoryEvent]:
        items: list[HistoryEvent] = []
        while True:
            r = self.request("GET", f"/v1/executions/{_seg(execution_id)}/history", params={"after": after})
            batch = orjson.loads(r.content)["items"]
            if not batch:
                return items
            items.extend(HistoryEvent.model_validate(e) for e in batch)
            after = batch[-1]["seq"]

    def replay(self, execution_id: str, *, from_step: str | None = None, input_patch: Mapping[str, Any] | None = None,
               version: str | int = "same", dry_run: bool = False,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Replay as a new execution (its `execution_id` in the answer); `from_step` keeps what ran before it."""
        body = _drop_none(from_step=from_step, input_patch=input_patch, version=version, dry_run=dry_run)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self.request("POST", f"/v1/executions/{_seg(execution_id)}/replay", json=body, headers=headers)
        return orjson.loads(r.content)

    def wait(self, execution_id: str, timeout: float | None = None) -> ExecutionOut:
        """Follow the execution's events until it has finished; then its summary. WaitTimeout after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        state = self.get(execution_id)
        after = state.events  # follow from here: a long history is not streamed again
        while state.status not in FINISHED:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(408, "timeout", f"execution {execution_id} did not finish within {timeout}s")
            try:
                finished, after = self._follow(execution_id, after, remaining)
            except (httpx.TimeoutException, httpx.TransportError):
                finished = False  # a broken or silent stream: look at the deadline, then reconnect
            if finished:
                state = self.get(execution_id)
            elif deadline is None or time.monotonic() < deadline:
                time.sleep(0.2)  # a stream that closed early: do not reconnect in a tight loop
        return state

    def _follow(self, execution_id: str, after: int, remaining: float | None) -> tuple[bool, int]:
        read = min(remaining, 30.0) if remaining is not None else 30.0
        timeout = httpx.Timeout(self.http.timeout.connect, read=read)
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
        with self.http.stream("GET", f"/v1/executions/{_seg(execution_id)}/events", headers=headers,
                              timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                raise error_of(response)
            sse = _Sse()
            deadline = None if remaining is None else time.monotonic() + remaining
            for line in response.iter_lines():
                event = sse.feed(line)
                if event is not None:
                    if event[1] is not None and event[1].isdigit():
                        after = int(event[1])
                    if event[0] == "end" or event[0] in _FINISHING:
                        return True, after
                if deadline is not None and time.monotonic() > deadline:
                    return False, after
        return False, after

    # ---- triggers -----------------------------------------------------------------------------

    def publish(self, type: str, data: Any = None, *, id: str | None = None, source: str | None = None,
                **attributes: Any) -> TriggerOut:
        """Publish a trigger event (a CloudEvent): the same (source, id) twice is published once."""
        body = _drop_none(type=type, data=_json(data) if data is not None else None, id=id, source=source,
                          **attributes)
        return TriggerOut.model_validate_json(self.request("POST", "/v1/triggers", json=body).content)

    def trigger_types(self) -> TriggerTypeList:
        """The subscribed CloudEvent types, each with its workflows and their `input_schema`."""
        return TriggerTypeList.model_validate_json(self.request("GET", "/v1/triggers/types").content)

    # ---- dead letters -------------------------------------------------------------------------

    def dead_letters(self, *, limit: int = 100, offset: int = 0, **filters: Any) -> DeadLetterPage:
        """Filters: workflow, step, kind, status (open by default, or all), since, until, error_contains."""
        params = _drop_none(limit=limit, offset=offset, **filters)
        return DeadLetterPage.model_validate_json(self.request("GET", "/v1/deadletters", params=params).content)

    def dead_letter(self, dead_letter_id: str) -> DeadLetterDetail:
        return DeadLetterDetail.model_validate_json(self.request("GET", f"/v1/deadletters/{_seg(dead_letter_id)}").content)

    def dead_letter_stats(self) -> DeadLetterStats:
        return DeadLetterStats.model_validate_json(self.request("GET", "/v1/deadletters/stats").content)

    def reprocess(self, ids: builtins.list[str] | None = None, *, filter: Mapping[str, Any] | None = None,
                  patch: Mapping[str, Any] | None = None, why: str | None = None,
                  dry_run: bool = False) -> DeadLetterActions:
        body = _drop_none(ids=ids, filter=filter, patch=patch, why=why, dry_run=dry_run)
        return DeadLetterActions.model_validate_json(self.request("POST", "/v1/deadletters/reprocess", json=body).content)

    def discard(self, ids: builtins.list[str] | None = None, *, reason: str, filter: Mapping[str, Any] | None = None,
                dry_run: bool = False) -> DeadLetterActions:
        body = _drop_none(ids=ids, filter=filter, reason=reason, dry_run=dry_run)
        return DeadLetterActions.model_validate_json(self.request("POST", "/v1/deadletters/discard", json=body).content)


# ---- async --------------------------------------------------------------------------------------


class AsyncRun:
    def __init__(self, client: AsyncClient, execution: ExecutionOut):
        self.client, self.execution = client, execution
        self.id = execution.execution_id
        self.created = execution.created

    async def wait(self, timeout: float | None = None) -> ExecutionOut:
        return await self.client.wait(self.id, timeout=timeout)

    async def get(self) -> ExecutionOut:
        return await self.client.get(self.id)

    async def cancel(self, why: str | None = None) -> ExecutionOut:
        return await self.client.cancel(self.id, why=why)


class AsyncClient:
    """The same calls as `Client`, awaited."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 0.2, max_backoff: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.url = _default_url(url)
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.http = httpx.AsyncClient(base_url=self.url, headers=_headers(api_key), timeout=timeout,
                                      transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = await self.http.request(method, path, **kw)
            if response.status_code < 400:
                return response
            if response.status_code != 503 or attempt == self.max_retries:
                raise error_of(response)
            await asyncio.sleep(_backoff(attempt, _retry_after(response), self.backoff, self.max_backoff))
        raise AssertionError("unreachable")

    async def publish_workflow(self, definition: Any) -> WorkflowVersionOut:
        body, media = _definition_text(definition)
        r = await self.request("POST", "/v1/workflows", content=body, headers={"Content-Type": media})
        return WorkflowVersionOut.model_validate_json(r.content)

    async def workflows(self) -> WorkflowList:
        return WorkflowList.model_validate_json((await self.request("GET", "/v1/workflows")).content)

    async def workflow(self, name: str, version: int | None = None) -> WorkflowVersionOut:
        name, version = _named(name, version)  # NAME@VERSION too
        path = f"/v1/workflows/{_seg(name)}" + (f"/versions/{int(version)}" if version is not None else "")
        return WorkflowVersionOut.model_validate_json((await self.request("GET", path)).content)

    async def history(self, execution_id: str, *, after: int = 0) -> list[HistoryEvent]:
        items: list[HistoryEvent] = []
        while True:
            r = await self.request("GET", f"/v1/executions/{_seg(execution_id)}/history", params={"after": after})
            batch = orjson.loads(r.content)["items"]
            if not batch:
                return items
            items.extend(HistoryEvent.model_validate(e) for e in batch)
            after = batch[-1]["seq"]

    async def dead_letter_stats(self) -> DeadLetterStats:
        return DeadLetterStats.model_validate_json((await self.request("GET", "/v1/deadletters/stats")).content)

    async def start(self, workflow: Any, input: Any = None, *, version: int | None = None,
                    idempotency_key: str | None = None) -> AsyncRun:
        body = _start_body(workflow, input, version)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = await self.request("POST", "/v1/executions", json=body, headers=headers)
        return AsyncRun(self, ExecutionOut.model_validate_json(r.content))

    async def start_many(self, items: Any) -> BatchStartOut:
        """Client.start_many, awaited."""
        r = await self.request("POST", "/v1/executions:batch", json=_batch_body(items))
        return BatchStartOut.model_validate_json(r.content)

    async def get(self, execution_id: str) -> ExecutionOut:
        r = await self.request("GET", f"/v1/executions/{_seg(execution_id)}")
        return ExecutionOut.model_validate_json(r.content)

    async def list(self, *, workflow: str | None = None, status: str | None = None, since: str | None = None,
                   until: str | None = None, limit: int = 50, cursor: str | None = None) -> ExecutionPage:
        params = _drop_none(workflow=workflow, status=status, since=since, until=until, limit=limit, cursor=cursor)
        return ExecutionPage.model_validate_json((await self.request("GET", "/v1/executions", params=params)).content)

    async def iter_executions(self, **filters: Any) -> AsyncIterator[Any]:
        cursor = None
        while True:
            page = await self.list(**filters, cursor=cursor)
            for row in page.items:
                yield row
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def cancel(self, execution_id: str, why: str | None = None) -> ExecutionOut:
        return await self._control(execution_id, "cancel", why)

    async def pause(self, execution_id: str, why: str | None = None) -> ExecutionOut:
        return await self._control(execution_id, "pause", why)

    async def resume(self, execution_id: str, why: str | None = None) -> ExecutionOut:
        return await self._control(execution_id, "resume", why)

    async def retry(self, execution_id: str, why: str | None = None) -> ExecutionOut:
        return await self._control(execution_id, "retry", why)

    async def _control(self, execution_id: str, command: str, why: str | None) -> ExecutionOut:
        r = await self.request("POST", f"/v1/executions/{_seg(execution_id)}/{command}", json=_control_body(why))
        return ExecutionOut.model_validate_json(r.content)

    async def replay(self, execution_id: str, *, from_step: str | None = None,
                     input_patch: Mapping[str, Any] | None = None, version: str | int = "same",
                     dry_run: bool = False, idempotency_key: str | None = None) -> dict[str, Any]:
        body = _drop_none(from_step=from_step, input_patch=input_patch, version=version, dry_run=dry_run)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = await self.request("POST", f"/v1/executions/{_seg(execution_id)}/replay", json=body, headers=headers)
        return orjson.loads(r.content)

    async def wait(self, execution_id: str, timeout: float | None = None) -> ExecutionOut:
        try:
            return await asyncio.wait_for(self._wait(execution_id), timeout=timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(408, "timeout", f"execution {execution_id} did not finish within {timeout}s") from None

    async def _wait(self, execution_id: str) -> ExecutionOut:
        state = await self.get(execution_id)
        after = state.events
        while state.status not in FINISHED:
            try:
                finished = False
                headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
                async with self.http.stream("GET", f"/v1/executions/{_seg(execution_id)}/events", headers=headers,
                                            timeout=httpx.Timeout(self.http.timeout.connect, read=30.0)) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise error_of(response)
                    sse = _Sse()
                    async for line in response.aiter_lines():
                        event = sse.feed(line)
                        if event is None:
                            continue
                        if event[1] is not None and event[1].isdigit():
                            after = int(event[1])
                        if event[0] == "end" or event[0] in _FINISHING:
                            finished = True
                            break
            except (httpx.TimeoutException, httpx.TransportError):
                finished = False  # a broken or silent stream: reconnect after the last event seen
            if finished:
                state = await self.get(execution_id)
            else:
                await asyncio.sleep(0.2)
        return state

    async def publish(self, type: str, data: Any = None, *, id: str | None = None, source: str | None = None,
                      **attributes: Any) -> TriggerOut:
        body = _drop_none(type=type, data=_json(data) if data is not None else None, id=id, source=source,
                          **attributes)
        return TriggerOut.model_validate_json((await self.request("POST", "/v1/triggers", json=body)).content)

    async def trigger_types(self) -> TriggerTypeList:
        return TriggerTypeList.model_validate_json((await self.request("GET", "/v1/triggers/types")).content)

    async def dead_letters(self, *, limit: int = 100, offset: int = 0, **filters: Any) -> DeadLetterPage:
        params = _drop_none(limit=limit, offset=offset, **filters)
        return DeadLetterPage.model_validate_json((await self.request("GET", "/v1/deadletters", params=params)).content)

    async def dead_letter(self, dead_letter_id: str) -> DeadLetterDetail:
        r = await self.request("GET", f"/v1/deadletters/{_seg(dead_letter_id)}")
        return DeadLetterDetail.model_validate_json(r.content)

    async def reprocess(self, ids: builtins.list[str] | None = None, *, filter: Mapping[str, Any] | None = None,
                        patch: Mapping[str, Any] | None = None, why: str | None = None,
                        dry_run: bool = False) -> DeadLetterActions:
        body = _drop_none(ids=ids, filter=filter, patch=patch, why=why, dry_run=dry_run)
        r = await self.request("POST", "/v1/deadletters/reprocess", json=body)
        return DeadLetterActions.model_validate_json(r.content)

    async def discard(self, ids: builtins.list[str] | None = None, *, reason: str, filter: Mapping[str, Any] | None = None,
                      dry_run: bool = False) -> DeadLetterActions:
        body = _drop_none(ids=ids, filter=filter, reason=reason, dry_run=dry_run)
        r = await self.request("POST", "/v1/deadletters/discard", json=body)
        return DeadLetterActions.model_validate_json(r.content)
