"""Dead letters without a broker: the view built from real histories in a real (SQLite)
store, reprocess and discard as events, patch checks, clusters, the metric."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from contracts import deadletters as dl
from contracts.definitions import parse_definition
from contracts.messages import StepError, StepResult
from services.deadletters import Actions, Filters, PatchError, find, list_dead_letters, refresh
from services.deadletters.actions import check_step_input, target_subject
from services.deadletters.metrics import OpenDeadLettersGauge, prometheus_text
from services.deadletters.view import error_signature, group_by_error, open_counts, ts, user_frames
from services.orchestrator.executions import Executions
from services.orchestrator.registry import Registry
from services.store import open_store

WF = """
name: unit-wf
steps:
  - id: a
    type: python
    with: {callable: "x.y:z"}
    input: {n: "${{ input.n }}"}
    retry: {max_attempts: 2, initial_delay: 0}
  - {id: b, type: noop, needs: [a]}
"""


@pytest.fixture
def store(tmp_path: Path):
    s = open_store(f"sqlite:///{tmp_path / 'weft.db'}")
    yield s
    s.close()


def _fail(execution_id: str, attempt: int, message: str = "n must be positive, got -3") -> StepResult:
    return StepResult(
        execution_id=execution_id, step_id="a", attempt=attempt, status="failed", worker_id="w1",
        error=StepError(type="ValueError", message=message, traceback=f"Traceback ...\nValueError: {message}\n"),
    )


def _dead_lettered(store: Any, n: int = -3, message: str = "n must be positive, got -3") -> str:
    version = Registry(store).publish(parse_definition(WF))
    executions = Executions(store)
    state, _ = executions.start(version, {"n": n})
    for attempt in (1, 2):
        executions.apply_results([_fail(state.id, attempt, message)])
    assert executions.load(state.id, fresh=True).status == "failed"
    return state.id


def _view(store: Any) -> None:
    refresh(store)


def _all(store: Any, **filters: Any) -> list[dict[str, Any]]:
    _view(store)
    with store.reader() as tx:
        return list_dead_letters(tx, Filters(**filters), limit=1000)


def test_a_step_dead_letter_carries_what_a_person_needs(store: Any) -> None:
    eid = _dead_lettered(store)
    [row] = _all(store)
    assert (row["kind"], row["source"], row["status"], row["workflow"]) == ("retries_exhausted", "step", "open", "unit-wf")
    assert (row["execution_id"], row["step_id"], row["item"], row["attempt"], row["delivered"]) == (eid, "a", None, 2, 2)
    assert orjson.loads(row["payload"]) == {"n": -3}
    assert row["error_type"] == "ValueError" and row["traceback"].endswith("got -3\n")
    assert row["details"]["idempotency_key"] == f"{eid}:a" and row["details"]["worker_id"] == "w1"
    assert row["id"] == dl.step_dead_letter_id(eid, row["details"]["execution_version"])
    with store.reader() as tx:
        assert find(tx, row["id"][:8])[0]["id"] == row["id"]
        assert find(tx, "zz") == []


def test_reprocess_twice_gives_one_attempt_and_the_view_follows(store: Any) -> None:
    eid = _dead_lettered(store)
    [row] = _all(store)
    actions = Actions(store)
    [first] = actions.reprocess_steps([row], {"n": 4}, "ann", "fixed the input")
    assert (first.outcome, first.attempt) == ("reprocessed", 3)
    head = store.head()
    [second] = actions.reprocess_steps([row], {"n": 4}, "bob", None)
    assert second.outcome == "already_reprocessed" and store.head() == head
    history = Executions(store).history(eid)
    assert [(e.attempt, e.input) for e in history if e.type == "StepScheduled"][-1] == (3, {"n": 4})
    assert sum(e.type == "StepReprocessRequested" for e in history) == 1
    [after] = _all(store)
    assert (after["status"], after["actor"], after["action_reason"]) == ("reprocessed", "ann", "fixed the input")
    acts = [dl.decode(r.type, r.data) for r in store.load(uuid.UUID(row["id"]))]
    assert [(a.type, a.by, a.patch) for a in acts] == [("DeadLetterReprocessed", "ann", {"n": 4})]
    [refused] = actions.discard_many([after], by="ann", why="too late")
    assert refused.outcome == "failed" and not refused.ok


def test_a_retry_of_the_execution_counts_as_reprocessing_its_dead_letter(store: Any) -> None:
    from services.orchestrator.decide import Retry

    eid = _dead_lettered(store)
    Executions(store).command(eid, Retry(by="carol", why="all fixed"))
    [row] = _all(store)
    assert (row["status"], row["actor"]) == ("reprocessed", "carol")
    [out] = Actions(store).reprocess_steps([row], None, "dave", None)
    assert out.outcome == "already_reprocessed" and "ExecutionRetried by carol" in out.detail


def test_discard_then_reprocess_is_refused(store: Any) -> None:
    _dead_lettered(store)
    [row] = _all(store)
    actions = Actions(store)
    assert actions.discard(row, by="erin", why="test data").outcome == "discarded"
    assert actions.discard(row, by="erin", why="again").outcome == "already_discarded"
    [out] = actions.reprocess_steps([row], None, "erin", None)
    assert out.outcome == "already_discarded" and not out.ok
    assert _all(store, status="discarded")[0]["action_reason"] == "test data"


def test_dry_run_stores_nothing(store: Any) -> None:
    _dead_lettered(store)
    [row] = _all(store)
    head = store.head()
    [out] = Actions(store).reprocess_steps([row], {"n": 9}, "x", None, dry_run=True)
    assert (out.outcome, out.preview) == ("would_reprocess", {"n": 9}) and store.head() == head


def test_patches_are_checked_before_anything_is_stored(store: Any) -> None:
    _dead_lettered(store)
    [row] = _all(store)
    actions = Actions(store)
    with pytest.raises(PatchError, match="JSON object"):
        actions.patched(row, [1])
    with pytest.raises(PatchError, match="no input to patch"):
        actions.patched({**row, "kind": "input_error"}, {"n": 1})
    with pytest.raises(PatchError, match="a merge patch applies to an object"):
        actions.patched({**row, "payload": "[1, 2]"}, {"n": 1})
    with pytest.raises(PatchError, match="bytes"):
        actions.patched(row, {"blob": "x" * 1_000_000})
    assert actions.patched(row, {"n": 5, "extra": None}) == {"n": 5}
    assert check_step_input("http", {}, {"params": [1]}) == ["input.params must be an object, not an array"]
    assert check_step_input("sleep", {}, {"seconds": "soon"}) and not check_step_input("sleep", {"seconds": 1}, {})

    message = {"id": "m", "kind": "poison", "source": "message", "payload_encoding": "utf-8",
               "source_subject": "weft.results.x", "payload": '{"execution_id": "e"}'}
    with pytest.raises(PatchError, match="still invalid"):
        actions.patched(message, {"step_id": "a"})
    fixed = actions.patched(message, {"step_id": "a", "attempt": 1, "status": "succeeded"})
    assert fixed["status"] == "succeeded"
    with pytest.raises(PatchError, match="not JSON"):
        actions.patched({**message, "payload": "garbage"}, {"a": 1})
    with pytest.raises(PatchError, match="base64"):
        actions.patched({**message, "payload_encoding": "base64"}, {"a": 1})


def test_where_a_message_goes_back_to() -> None:
    event = orjson.dumps({"id": "1", "source": "s", "type": "order.created"})
    assert target_subject({"kind": "poison", "source_subject": "weft.results.x"}, b"") == "weft.results.x"
    assert target_subject({"kind": "trigger_invalid", "source_subject": "webhook:/orders"}, event) == "weft.triggers.order.created"
    assert target_subject({"kind": "poison", "source_subject": "webhook:/orders"}, event) is None
    assert target_subject({"kind": "poison", "source_subject": ""}, b"") is None


def test_clusters_and_filters(store: Any) -> None:
    for n in (-3, -40, -5):
        _dead_lettered(store, n, f"n must be positive, got {n}")
    _dead_lettered(store, 1, "connection to 10.0.0.7:5432 refused after 3.5s ('db-main')")
    rows = _all(store)
    groups = group_by_error(rows)
    assert [(g["count"], g["error"]) for g in groups] == [
        (3, "n must be positive, got <n>"), (1, "connection to <n>.<n>:<n> refused after <n>s (<str>)")]
    assert len(groups[0]["ids"]) == 3 and groups[0]["workflows"] == ["unit-wf"]
    assert error_signature({"error_message": None}) == ""
    assert len(_all(store, error_contains="REFUSED")) == 1
    assert len(_all(store, error_contains="100%_")) == 0  # LIKE wildcards are literal
    assert len(_all(store, kind="step")) == 4 and _all(store, kind="message") == []
    assert _all(store, since=ts("2999-01-01T00:00:00Z")) == []
    assert len(_all(store, until=ts("2999-01-01T00:00:00Z"), workflow="unit-wf", step="a", status="open")) == 4


def test_the_open_gauge_and_prometheus_text(store: Any) -> None:
    _dead_lettered(store)
    _view(store)
    provider = MeterProvider(metric_readers=[reader := InMemoryMetricReader()])
    OpenDeadLettersGauge(store, provider.get_meter("unit"))

    def points() -> dict[tuple[str, str], int]:
        data = reader.get_metrics_data()
        return {(p.attributes["kind"], p.attributes["workflow"]): p.value
                for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                if m.name == "weft.dlq.open" for p in m.data.data_points}

    assert points() == {("retries_exhausted", "unit-wf"): 1}
    [row] = _all(store)
    Actions(store).discard(row, by="x", why="y")
    _view(store)
    assert points() == {("retries_exhausted", "unit-wf"): 0}  # drops to zero, not out of sight
    provider.shutdown()
    with store.reader() as tx:
        assert open_counts(tx) == []
    text = prometheus_text([("poison", 'a"b\\c', 2)])
    assert '# TYPE weft_dlq_open gauge' in text and 'weft_dlq_open{kind="poison",workflow="a\\"b\\\\c"} 2' in text


def test_payloads_round_trip_byte_for_byte() -> None:
    for data in (b"plain", "ünïcode".encode(), b"\xff\x00\xfe", b""):
        assert dl.decode_payload(*dl.encode_payload(data)) == data
    assert dl.encode_payload(b"\xff")[1] == "base64"
    assert [dl.step_kind(r) for r in ("retries exhausted after 3 attempts", "non-retryable error", "input error")] == [
        "retries_exhausted", "non_retryable", "input_error"]


def test_tracebacks_keep_the_steps_own_frames() -> None:
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/opt/weft/services/worker/runtime.py", line 1, in execute\n'
        "    output = await handler()\n"
        "             ^^^^^^^^^^^^^^^\n"
        '  File "/usr/lib/python3.11/asyncio/tasks.py", line 2, in wait_for\n'
        "    return await fut\n"
        '  File "/home/me/shop/steps.py", line 3, in charge\n'
        "    raise ConnectionError('down')\n"
        "ConnectionError: down\n"
    )
    text, hidden = user_frames(tb, ["/opt/weft/", "/usr/lib/python3.11/"])
    assert hidden == 2
    assert text.splitlines() == [
        "Traceback (most recent call last):", '  File "/home/me/shop/steps.py", line 3, in charge',
        "    raise ConnectionError('down')", "ConnectionError: down"]
    assert user_frames(tb, ["/"]) == (tb.rstrip(), 0)  # never hide everything


def test_the_view_is_a_projection_shown_in_status_and_rebuilt_to_the_same_rows(store: Any) -> None:
    from contracts.subjects import result_subject
    from services.projections import projection_status, rebuild, view_named
    from services.store import NewEvent

    eid = _dead_lettered(store)
    key = "results:7"
    body = orjson.dumps({"execution_id": eid, "step_id": "a", "attempt": 10**12, "status": "bogus"}).decode()
    recorded = dl.DeadLetterRecorded(at=ts("2026-01-02T03:04:05Z"), dead_letter_id=dl.message_dead_letter_id(key),
                                     kind="poison", key=key, source_subject=result_subject("python"), payload=body,
                                     reason="schema", delivered=1, dlq_seq=7)
    store.append([NewEvent(uuid.UUID(recorded.dead_letter_id), 1, recorded.type, dl.encode(recorded))])
    before = _all(store)
    Actions(store).discard_many([r for r in before if r["source"] == "message"], by="ann", why="garbage")
    before = _all(store)
    message = next(r for r in before if r["source"] == "message")
    # found out from the payload: which execution (and so which workflow) it was about; an
    # attempt number that does not fit the column is left out rather than stalling the view
    assert (message["execution_id"], message["workflow"], message["attempt"]) == (eid, "unit-wf", None)
    assert (message["status"], message["actor"]) == ("discarded", "ann")
    status = {r["name"]: r for r in projection_status(store, [view_named("dead_letters")])}
    assert status["dead_letters"]["lag"] == 0 and status["dead_letters"]["tables"] == ["weft_dead_letters"]
    result = rebuild(store, view_named("dead_letters"))
    assert result.generation == 1 and result.events == 3  # dead-lettered, recorded, discarded
    assert _all(store) == before
