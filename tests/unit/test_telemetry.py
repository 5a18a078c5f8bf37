"""Telemetry without a broker: OTEL_* parsing, traceparent checks, JSON log lines with the step's
context (issue 15, parts 1 and 3), and spans of a step attempt, a replay and a trigger in memory."""

from __future__ import annotations

import asyncio
import uuid
import io
import logging
from datetime import datetime, timezone
from typing import Any, Iterator

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from contracts.messages import StepReady
from services.telemetry import logs, tracing
from services.telemetry.observed import ObservedWorker
from services.worker.steps import StepRegistry

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_tracing_is_on_only_when_the_standard_variables_ask() -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})


def test_exporter_names_follow_the_otlp_protocol() -> None:
    assert tracing.exporter_names({}) == ["otlp_proto_http"]
    assert tracing.exporter_names({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == ["otlp_proto_grpc"]
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "otlp,console",
                                   "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}) == ["otlp_proto_http", "console"]
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"):
        tracing.exporter_names({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_an_exporter_that_is_not_installed_is_named() -> None:
    with pytest.raises(RuntimeError, match="no trace exporter 'zipkin'"):
        tracing.setup(env={"OTEL_TRACES_EXPORTER": "zipkin"})
    assert not tracing.enabled()


@pytest.mark.parametrize("bad", [
    None, 7, "", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", TP.upper(), TP + "x",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01", "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "\udcff" * 55, "0" * 100_000,
])
def test_only_a_well_formed_traceparent_is_taken(bad: Any) -> None:
    assert tracing.valid(bad) is None
    assert tracing.context_of(bad) is None
    assert tracing.valid(TP) == TP


# ---- JSON logs --------------------------------------------------------------------------------


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(handler)
    root.setLevel(old)


def _ready(**kw: Any) -> StepReady:
    return StepReady(execution_id="e-1", workflow="wf", step_id="charge", attempt=2, step_type="talk",
                     idempotency_key="e-1:charge", scheduled_at=datetime.now(timezone.utc), trace_id=TP, **kw)


class _Transport:  # the worker's constructor asks for nothing of it until run()
    async def publish_many(self, messages: Any) -> None:
        raise AssertionError("not used")


def _worker(handler: Any) -> ObservedWorker:
    registry = StepRegistry()
    registry.register("talk", handler)
    return ObservedWorker(_Transport(), registry, worker_id="w-1")  # type: ignore[arg-type]


async def test_a_steps_log_lines_are_json_with_its_execution_step_attempt_and_trace(json_lines: io.StringIO) -> None:
    async def talk(input: Any, config: Any, ctx: Any) -> str:
        logging.getLogger("shop").info("charging %s", input)
        logging.getLogger("shop").warning("odd bytes \udcff and \x00 and \"quotes\"")
        return "ok"

    result = await _worker(talk).execute(_ready(input="o-1"))
    assert result.status == "succeeded"
    logging.getLogger("weft.test").info("outside any step")
    lines = [orjson.loads(line) for line in json_lines.getvalue().splitlines()]
    assert len(lines) == 3
    first, second, outside = lines
    assert first["message"] == "charging o-1" and first["logger"] == "shop" and first["level"] == "INFO"
    for line in (first, second):
        assert (line["execution_id"], line["step_id"], line["attempt"], line["trace_id"]) == ("e-1", "charge", 2, TP)
    assert second["message"] == 'odd bytes \\udcff and \x00 and "quotes"'  # escaped, still one line
    assert "execution_id" not in outside and "step_id" not in outside  # the context ends with the attempt
    assert datetime.fromisoformat(first["time"]).tzinfo is not None


def test_an_exception_is_one_line(json_lines: io.StringIO) -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger("weft.test").exception("failed")
    [line] = json_lines.getvalue().splitlines()
    parsed = orjson.loads(line)
    assert parsed["message"] == "failed" and "ValueError: boom" in parsed["exception"]


def test_an_unknown_log_format_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="WEFT_LOG_FORMAT='yaml'"):
        logs.configure("INFO", "yaml")


# ---- spans, with an in-memory exporter ----------------------------------------------------------


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_enabled", True)
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


async def test_a_step_attempt_is_one_span_with_its_attributes_and_error(spans: InMemorySpanExporter) -> None:
    from services.telemetry.hops import result_headers

    async def talk(input: Any, config: Any, ctx: Any) -> None:
        raise ConnectionError("backend away")

    worker = _worker(talk)

    async def attempt() -> tuple[Any, Any]:
        result = await worker.execute(_ready())
        return result, result_headers()

    result, headers = await asyncio.create_task(attempt())
    assert result.status == "failed"
    [span] = spans.get_finished_spans()
    assert span.name == "step charge" and span.kind == trace.SpanKind.CONSUMER
    assert span.parent is not None and f"{span.parent.trace_id:032x}" == TP.split("-")[1]
    a = dict(span.attributes or {})
    assert (a["weft.execution_id"], a["weft.workflow"], a["weft.step_id"], a["weft.attempt"], a["weft.outcome"]) == (
        "e-1", "wf", "charge", 2, "failed")
    assert span.status.status_code == trace.StatusCode.ERROR
    [event] = span.events
    assert event.name == "exception" and event.attributes["exception.type"] == "ConnectionError"
    # The result travels with the attempt's span as its parent.
    assert headers == {"traceparent": f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"}


# ---- start, replay and trigger: what the execution records --------------------------------------


@pytest.fixture
def store(tmp_path: Any) -> Iterator[Any]:
    from services.store import open_store

    s = open_store(f"sqlite:///{tmp_path / 't.db'}")
    yield s
    s.close()


def test_a_replays_trace_links_to_the_originals(store: Any, spans: InMemorySpanExporter) -> None:
    from contracts.definitions import parse_definition
    from services.orchestrator.registry import Registry
    from services.replay.replay import replay_execution
    from services.telemetry.observed import ObservedExecutions

    version = Registry(store).publish(parse_definition("name: r\nsteps:\n  - {id: a, type: noop}\n"))
    executions = ObservedExecutions(store)
    original, _ = executions.start(version, {})
    assert tracing.valid(original.trace_id)
    replay = replay_execution(store, original.id, executions=executions)
    copy = executions.load(replay["execution_id"])
    assert tracing.valid(copy.trace_id) and copy.trace_id.split("-")[1] != original.trace_id.split("-")[1]
    first, second = spans.get_finished_spans()
    assert first.name == second.name == "start r"
    [link] = second.links
    assert (link.context.trace_id, link.context.span_id) == (first.context.trace_id, first.context.span_id)
    assert dict(second.attributes or {})["weft.replay_of"] == original.id
    # A traced execution's steps carry its context, for the relay's headers.
    scheduled = [e for e in executions.history(copy.id) if e.type == "StepScheduled"]
    assert scheduled and all(e.trace_id == copy.trace_id and e.workflow == "r" for e in scheduled)


@pytest.mark.parametrize("traced", [True, False])
def test_a_cloudevents_traceparent_is_joined(store: Any, traced: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from contracts.definitions import parse_definition
    from contracts.triggers import CloudEvent
    from services.orchestrator.registry import Registry
    from services.orchestrator.executions import Executions
    from services.telemetry.observed import ObservedIngestor
    from services.triggers.ingest import Trigger
    from services.triggers.routing import Catalog

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_enabled", traced)
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("test"))
    Registry(store).publish(parse_definition("name: t\non: [{event: t.x}]\nsteps: [{id: s, type: noop}]\n"))
    catalog = Catalog(store)
    ingestor = ObservedIngestor(Executions(store), catalog)
    event = CloudEvent.model_validate({"id": "e-1", "source": "test", "type": "t.x", "data": {}, "traceparent": TP})
    plain = CloudEvent.model_validate({"id": "e-2", "source": "test", "type": "t.x", "data": {},
                                       "traceparent": "not one"})
    outcomes = ingestor.ingest([Trigger(event), Trigger(plain)])
    assert [o.status for o in outcomes] == ["accepted", "accepted"]
    started = {r.stream_id: orjson.loads(r.data)["trace_id"] for r in store.read(0, 100, types=["ExecutionStarted"])}
    joined = started[uuid.UUID(outcomes[0].executions["t@1"])]
    other = started[uuid.UUID(outcomes[1].executions["t@1"])]
    assert joined.split("-")[1] == TP.split("-")[1]
    if traced:
        assert joined != TP  # the ingestion span's own id, a child of the event's
        ingest_span = next(s for s in exporter.get_finished_spans() if s.attributes["cloudevents.event_id"] == "e-1")
        assert f"{ingest_span.parent.span_id:016x}" == TP.split("-")[2]
        assert tracing.valid(other) and other.split("-")[1] != TP.split("-")[1]  # a new trace of its own
    else:
        assert joined == TP and other is None  # recorded as given; a malformed one is not
    provider.shutdown()


def test_the_grafana_dashboard_asks_only_for_metrics_weft_serves() -> None:
    import json
    import re
    from pathlib import Path

    from prometheus_client import REGISTRY

    import services.telemetry.metrics  # noqa: F401 - registers them

    served = {s for m in REGISTRY.collect() if m.name.startswith("weft_")
              for s in (m.name, f"{m.name}_total", f"{m.name}_bucket", f"{m.name}_count", f"{m.name}_sum")}
    served |= {"weft_log_lag_events", "weft_dlq_open"}  # read from the store at scrape time (StoreCollector)
    dashboard = json.loads((Path(__file__).parents[2] / "infra" / "grafana" / "weft-dashboard.json").read_text())
    asked = {name for p in dashboard["panels"] for t in p["targets"] for name in re.findall(r"weft_\w+", t["expr"])}
    assert asked and asked <= served, asked - served
