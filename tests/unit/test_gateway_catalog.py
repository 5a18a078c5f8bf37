"""The catalog (latest versions and routing tables) and the ingestor, over a SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from contracts.definitions import parse_definition
from contracts.triggers import TriggerAccepted, trigger_stream
from services.orchestrator.executions import Executions
from services.orchestrator.registry import Registry
from services.store import open_store
from services.triggers.ingest import Ingestor, Trigger, trigger_execution_id
from services.triggers.publish import new_event
from services.triggers.routing import Catalog


@pytest.fixture
def store(tmp_path: Path):
    s = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    yield s
    s.close()


def publish(store: Any, text: str) -> None:
    Registry(store).publish(parse_definition(text))


def test_routing_follows_new_versions_and_filters(store: Any) -> None:
    publish(store, "name: a\non: [{event: t.x, filter: {data.k: 1}}]\nsteps: [{id: s, type: noop}]\n")
    publish(store, "name: b\non: [{event: t.x}, {event: t.x, filter: {data.k: 2}}]\nsteps: [{id: s, type: noop}]\n")
    catalog = Catalog(store)
    catalog.refresh(force=True)
    ev = {"type": "t.x", "data": {"k": 2}}
    routing = catalog.route(ev)
    assert [r.label for r in routing.routes] == ["b@1"] and routing.filtered == ["a@1"] and routing.subscribed
    assert [r.label for r in catalog.route({"type": "t.x", "data": {"k": 1}}).routes] == ["a@1", "b@1"]
    assert not catalog.route({"type": "t.y"}).subscribed
    publish(store, "name: a\non: [{event: t.x, filter: {data.k: 2}}]\nsteps: [{id: s, type: noop}]\n")
    assert catalog.refresh(force=True)
    assert [r.label for r in catalog.route(ev).routes] == ["a@2", "b@1"]
    assert not catalog.refresh(force=True)  # nothing new


def test_webhooks_and_crons_are_indexed(store: Any) -> None:
    publish(store, "name: h\non: [{webhook: {path: /in/orders/}}, {cron: '*/5 * * * *'}]\nsteps: [{id: s, type: noop}]\n")
    catalog = Catalog(store)
    catalog.refresh(force=True)
    assert [r.label for r in catalog.webhooks("in/orders")] == ["h@1"]
    assert catalog.webhooks("/in") == []
    assert [r.spec.cron for r in catalog.crons()] == ["*/5 * * * *"]


def test_ingest_records_the_event_and_starts_each_workflow_once(store: Any) -> None:
    publish(store, "name: w\non: [{webhook: {path: /p}}, {webhook: {path: /p}}]\nsteps: [{id: s, type: noop}]\n")
    catalog = Catalog(store)
    catalog.refresh(force=True)
    ingestor = Ingestor(Executions(store), catalog)
    event = new_event("weft.webhook", {"a": 1}, id="d-1", source="weft:webhook/p")
    [first] = ingestor.ingest([Trigger(event, via="webhook", routes=catalog.webhooks("/p"))])
    assert first.status == "accepted" and first.executions == {"w@1": trigger_execution_id("w", "weft:webhook/p", "d-1")}
    # the same event twice in one batch and once more later: still one execution
    outcomes = ingestor.ingest([Trigger(event, via="webhook", routes=catalog.webhooks("/p"))] * 2)
    assert [o.status for o in outcomes] == ["duplicate", "duplicate"]
    assert [o.executions for o in outcomes] == [first.executions] * 2
    started = store.read(0, 100, types=["ExecutionStarted"])
    assert len(started) == 1 and orjson.loads(started[0].data)["input"] == {"a": 1}
    [log] = store.load(trigger_stream("weft:webhook/p", "d-1"))
    assert TriggerAccepted.model_validate_json(log.data).via == "webhook"


def test_a_batch_with_a_repeat_inside_stores_the_rest_together(store: Any) -> None:
    publish(store, "name: w\non: [{event: t.x}]\nsteps: [{id: s, type: noop}]\n")
    catalog = Catalog(store)
    ingestor = Ingestor(Executions(store), catalog)
    old = new_event("t.x", {}, id="old", source="s")
    ingestor.ingest([Trigger(old)])
    batch = [Trigger(new_event("t.x", {"n": n}, id=f"new-{n}", source="s")) for n in range(5)]
    batch.insert(2, Trigger(old))
    outcomes = ingestor.ingest(batch)
    assert [o.status for o in outcomes] == ["accepted", "accepted", "duplicate", "accepted", "accepted", "accepted"]
    assert len(store.read(0, 100, types=["ExecutionStarted"])) == 6
