"""/metrics on the gateway of a whole stack, moving under a small load (issue 15, part 2).

The stack runs every service in this process, as `weft up` does; its gateway's
/metrics is scraped before and after a bounded load (executions started over
HTTP, one of which fails and is dead-lettered), and the numbers must move.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.steps import POSITIVE
from tests.support import stack_up, wait_until

pytestmark = pytest.mark.integration

LOAD = 20

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _any(samples: Samples, name: str, **labels: str) -> list[float]:
    return [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]


async def test_metrics_move_under_load(tmp_path: Path, pg_url: str, nats_url: str) -> None:
    name = f"m{uuid.uuid4().hex[:6]}"
    flow = f"name: {name}\nsteps:\n  - {{id: a, type: noop}}\n  - {{id: b, type: sleep, needs: [a], with: {{seconds: 0.01}}}}\n"
    async with stack_up(tmp_path, pg_url, nats_url, gateway_auth=False) as s:
        s.publish(flow)
        s.publish(POSITIVE)
        base = s.stack.gateway.url
        async with httpx.AsyncClient(timeout=10) as client:
            before = _parse((await client.get(f"{base}/metrics")).text)
            ids = []
            caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            for i in range(LOAD):
                # Tracing is off here: a caller's traceparent is still recorded as given (a bad one is not).
                headers = {"traceparent": caller if i == 0 else "00-bad"}
                r = await client.post(f"{base}/v1/executions", json={"workflow": name, "input": {"i": i}},
                                      headers=headers)
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            bad = await client.post(f"{base}/v1/executions", json={"workflow": "needs-positive", "input": {"n": -1}})
            assert bad.status_code == 201, bad.text
            for eid in ids:
                assert (await s.finished(eid)).status == "completed"
            assert [(await s.history(eid))[0].trace_id for eid in ids[:2]] == [caller, None]
            failed = await s.finished(bad.json()["id"])
            assert failed.status == "failed"

            async def scraped() -> Samples | None:
                after = _parse((await client.get(f"{base}/metrics")).text)
                done = _get(after, "weft_executions_completed_total", workflow=name) - _get(
                    before, "weft_executions_completed_total", workflow=name)
                dlq = sum(_any(after, "weft_dlq_open", workflow="needs-positive"))
                # The relay saves its position at most every 0.2 s: its lag reaches 0 that much later.
                relay_idle = _get(after, "weft_log_lag_events", follower="relay") == 0
                return after if done == LOAD and dlq >= 1 and relay_idle else None

            try:
                after = await wait_until(scraped, timeout=30, what="the counters to catch up")
            except AssertionError:
                print((await client.get(f"{base}/metrics")).text)
                raise
            out = os.environ.get("WEFT_METRICS_DUMP")  # for the README: a real scrape
            if out:
                Path(out).write_text((await client.get(f"{base}/metrics")).text)

        def moved(metric: str, **labels: str) -> float:
            return _get(after, metric, **labels) - _get(before, metric, **labels)

        assert moved("weft_executions_started_total", workflow=name) == LOAD
        assert moved("weft_executions_failed_total", workflow="needs-positive") == 1
        assert moved("weft_step_attempts_total", step_type="noop", outcome="succeeded") >= LOAD
        assert moved("weft_step_attempts_total", step_type="python", outcome="failed") >= 1
        assert moved("weft_step_duration_seconds_count", step_type="sleep") >= LOAD
        assert moved("weft_step_duration_seconds_sum", step_type="sleep") >= LOAD * 0.01
        assert moved("weft_step_dispatch_latency_seconds_count", step_type="noop") >= LOAD
        assert moved("weft_steps_dead_lettered_total", workflow="needs-positive") >= 1
        assert moved("weft_relay_published_total") >= 2 * LOAD + 1
        assert moved("weft_http_request_duration_seconds_count", method="POST", route="/v1/executions",
                     status="201") == LOAD + 1
        # What is waiting is a gauge: present for both consumers, and back to nothing when idle.
        assert _any(after, "weft_broker_pending", consumer="workers")
        assert _any(after, "weft_broker_pending", consumer="orchestrator")
        followers = {dict(ls)["follower"] for (n, ls) in after if n == "weft_log_lag_events"}
        assert "relay" in followers and any(f.startswith("view:") for f in followers)
        assert _get(after, "weft_log_lag_events", follower="relay") == 0  # idle: every command published
        # Route templates, never raw paths (one time series per route, not per execution id).
        assert not [ls for (n, ls) in after if n.startswith("weft_http") and any(
            eid in v for _, v in ls for eid in ids)]
