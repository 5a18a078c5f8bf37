"""The console in a real browser (chromium via Playwright) against `weft up` with API keys required."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.e2e.console_support import ROOT, Browser, Stack, browser_fixture, need_chromium

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SLOW = """
name: slow-then-done
input_schema: {type: object, properties: {n: {type: integer}}}
steps:
  - {id: wait, type: sleep, with: {seconds: 1.5}}
  - {id: done, type: transform, needs: [wait], with: {expression: "{ok: `true`}"}}
output: "${{ steps.done.output }}"
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: Any) -> Iterator[Browser]:
    yield from browser_fixture(tmp_path_factory)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: Any) -> Iterator[Stack]:
    need_chromium()  # no stack to start when the browser test would skip
    home = tmp_path_factory.mktemp("console")
    up = Stack(home / "home", WEFT_GATEWAY_AUTH="true")
    try:
        up.publish(home / "slow.yaml", SLOW)
        up.weft("workflows", "publish", "examples/order.yaml")
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def admin(stack: Stack) -> str:
    return stack.key("admin", "--name", "ops")


def start(stack: Stack, key: str, workflow: str, data: Any) -> str:
    res = httpx.post(f"{stack.url}/v1/executions", json={"workflow": workflow, "input": data},
                     headers={"Authorization": f"Bearer {key}"})
    assert res.status_code == 201, res.text
    return str(res.json()["id"])


@pytest.fixture(scope="module")
def reader(stack: Stack) -> str:
    return stack.key("read", "--name", "viewer")


def test_sign_in_then_start_an_execution_and_watch_it_complete_live(stack: Stack, browser: Browser, admin: str) -> None:
    assert f"console         {stack.url}/ui" in stack.log.read_text()  # `weft up` prints the address
    page = browser.page()
    response = page.goto(f"{stack.url}/ui/")
    assert response is not None
    headers = response.headers
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "script-src 'self'" in headers["content-security-policy"]
    # Keys required: the console asks for one before showing anything.
    page.wait_for_selector("#signin:not([hidden])")
    assert page.locator("#main").is_hidden()
    page.fill("#signin-key", "weft_00000000_" + "A" * 43)
    page.click("#signin-form button")
    page.wait_for_selector("#signin-error:has-text('401')")
    page.fill("#signin-key", admin)
    page.click("#signin-form button")
    page.wait_for_selector("#who:has-text('ops')")
    assert page.locator("#auth-off").count() == 0
    page.wait_for_selector("#live.on")  # subscribed to /v1/changes

    # Start from the UI: the row appears at once and turns completed without a reload.
    page.click("#start summary")
    page.select_option("#s-workflow", "slow-then-done")
    page.fill("#s-input", '{"n": 1}')
    page.click("#s-submit")
    link = page.wait_for_selector("#started-link")
    eid = link.inner_text()
    row = f"#executions tr[data-id='{eid}']"
    page.wait_for_selector(f"{row} .badge:has-text('running')")
    browser.shot(page, "executions-running")
    page.wait_for_selector(f"{row} .badge:has-text('completed')", timeout=30_000)

    # One started elsewhere (another client) shows up live too.
    other = httpx.post(f"{stack.url}/v1/executions", json={"workflow": "slow-then-done", "input": {"n": 2}},
                       headers={"Authorization": f"Bearer {admin}"})
    assert other.status_code == 201, other.text
    page.wait_for_selector(f"#executions tr[data-id='{other.json()['id']}']")
    page.wait_for_function("() => document.querySelectorAll('#executions tbody tr[data-id]').length >= 2")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#executions tbody tr[data-id] .badge')].every(b => b.textContent === 'completed')",
        timeout=30_000)
    browser.shot(page, "executions")

    # Cursor paging: one row a page, newest first.
    page.goto(f"{stack.url}/ui/executions?limit=1")
    page.wait_for_selector("#executions tbody tr[data-id]")
    first = page.get_attribute("#executions tbody tr[data-id]", "data-id")
    page.click("#next")
    page.wait_for_selector("#count:has-text('page 2')")
    second = page.get_attribute("#executions tbody tr[data-id]", "data-id")
    assert first != second and {first, second} == {eid, other.json()["id"]}
    page.click("#first")
    page.wait_for_selector(f"#executions tbody tr[data-id='{first}']")

    # Filters: status and an id prefix.
    page.select_option("#f-status", "failed")
    page.click("#filters button")
    page.wait_for_selector("#executions td.empty")
    page.select_option("#f-status", "")
    page.fill("#f-id", eid[:8])
    page.click("#filters button")
    page.wait_for_function("() => document.querySelectorAll('#executions tbody tr[data-id]').length === 1")
    assert page.locator(row).count() == 1
    assert not browser.errors, browser.errors


def test_a_read_only_key_sees_no_controls(stack: Stack, browser: Browser, reader: str) -> None:
    page = browser.page(key=reader)
    page.goto(f"{stack.url}/ui/executions")
    page.wait_for_selector("#who:has-text('viewer')")
    page.wait_for_selector("#executions tbody tr")
    assert page.locator("#start").count() == 0  # no trigger scope: no start form
    # And the API refuses anyway.
    status = page.evaluate("""async () => { try { await Weft.api('POST', '/v1/executions', {workflow: 'slow-then-done'}); }
                               catch (e) { return e.status; } return 200; }""")
    assert status == 403
    assert not browser.errors, browser.errors


def test_cross_site_posts_and_framing_are_refused(stack: Stack, admin: str) -> None:
    forged = httpx.post(f"{stack.url}/v1/executions", json={"workflow": "slow-then-done"},
                        headers={"Origin": "https://evil.example", "Authorization": f"Bearer {admin}"})
    assert forged.status_code == 403 and "cross-site" in forged.text
    docs = httpx.get(f"{stack.url}/v1/docs")
    assert docs.status_code == 200 and "/v1/docs/assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    assert re.search(r"frame-ancestors 'none'", docs.headers["content-security-policy"])
    assert httpx.get(f"{stack.url}/v1/docs/assets/swagger-ui-bundle.js").status_code == 200


def test_swagger_ui_renders_offline(stack: Stack, browser: Browser) -> None:
    page = browser.page()
    page.goto(f"{stack.url}/v1/docs")
    page.wait_for_selector(".swagger-ui .info .title:has-text('Weft')")
    page.wait_for_selector(".opblock-summary-path:has-text('/v1/executions')")


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory: Any) -> Iterator[Stack]:
    need_chromium()
    up = Stack(tmp_path_factory.mktemp("console-open") / "home")
    try:
        yield up
    finally:
        up.stop()


def test_auth_off_on_loopback_says_so(open_stack: Stack, browser: Browser) -> None:
    page = browser.page()
    page.goto(f"{open_stack.url}/ui/executions")
    page.wait_for_selector("#auth-off")
    page.wait_for_selector("#who:has-text('auth off')")
    assert page.locator("#signin").is_hidden()
    assert page.locator("#start").count() == 1  # auth off: every caller is an unbound admin


def test_one_execution_dag_timeline_and_time_travel(stack: Stack, browser: Browser, admin: str) -> None:
    eid = start(stack, admin, "order-fulfilment", {"order_id": "A-1", "items": ["apple", "pear"]})
    page = browser.page(key=admin)
    page.goto(f"{stack.url}/ui/executions/{eid}")
    page.wait_for_selector("#x-status:has-text('completed')", timeout=30_000)
    # The DAG left to right, coloured by status; the map step shows its item count.
    page.wait_for_selector("#dag g.node[data-step='ship_each'][data-status='succeeded']:has-text('2 items')")
    xs = [page.eval_on_selector(f"#dag g.node[data-step='{s}']", "g => g.transform.baseVal[0].matrix.e")
          for s in ("reserve", "ship_each", "summary")]
    assert xs == sorted(xs) and len(set(xs)) == 3
    # The Gantt has a row per attempt: one per map item, and the retry of item 1 after its back-off.
    assert page.locator("#gantt g.attempt[data-step='ship_each']").count() == 3
    assert page.locator("#gantt g.attempt[data-step='ship_each'][data-status='failed']").count() == 1
    assert page.locator("#gantt g.attempt[data-step='ship_each'] rect.f-backoff").count() == 1
    page.click("#dag g.node[data-step='reserve']")
    page.wait_for_selector("#step-detail pre.output:has-text('apple')")
    page.wait_for_selector("#step-detail pre.input:has-text('A-1')")
    browser.shot(page, "execution")

    # Time travel to event 2: only the first step has been scheduled; later events are dimmed.
    page.locator("#travel").fill("2")
    page.wait_for_selector("#as-of:has-text('as of event 2')")
    page.wait_for_selector("#x-status:has-text('running')")
    page.wait_for_selector("#dag g.node[data-step='reserve'][data-status='scheduled']")
    page.wait_for_selector("#dag g.node[data-step='summary'][data-status='pending']")
    assert page.locator("#history tr.future").count() > 0
    assert page.locator("[data-control='cancel']").is_disabled()
    browser.shot(page, "execution-time-travel")
    page.click("#travel-live")
    page.wait_for_selector("#x-status:has-text('completed')")
    assert page.locator("#history tr.future").count() == 0
    assert not browser.errors, browser.errors


def test_pause_and_resume_live(stack: Stack, browser: Browser, admin: str) -> None:
    eid = start(stack, admin, "slow-then-done", {"n": 3})
    page = browser.page(key=admin)
    page.goto(f"{stack.url}/ui/executions/{eid}")
    page.wait_for_selector("#x-status:has-text('running')")
    page.click("[data-control='pause']")
    page.wait_for_selector("#x-status:has-text('paused')")
    page.wait_for_selector("#dag g.node[data-step='wait'][data-status='succeeded']", timeout=30_000)
    page.wait_for_selector("[data-control='resume']:not([disabled])")
    page.click("[data-control='resume']")
    page.wait_for_selector("#x-status:has-text('completed')", timeout=30_000)
    page.wait_for_selector("#history td:has-text('ExecutionResumed')")


def test_replay_with_a_checked_input_patch_and_a_dry_run(stack: Stack, browser: Browser, admin: str) -> None:
    eid = start(stack, admin, "order-fulfilment", {"order_id": "B-2", "items": ["fig"]})
    page = browser.page(key=admin)
    page.goto(f"{stack.url}/ui/executions/{eid}")
    page.wait_for_selector("#x-status:has-text('completed')", timeout=30_000)
    page.select_option("#r-from", "ship_each")
    page.click("#r-dry")
    page.wait_for_selector("#r-preview:has-text('re-runs: ship_each, summary')")
    page.wait_for_selector("#r-preview:has-text('reuses: reserve')")
    # A patch the input schema refuses is refused before anything is stored.
    page.select_option("#r-from", "")
    page.fill("#r-patch", '{"order_id": 5}')
    page.wait_for_selector("#r-error:has-text('order_id')")  # checked as typed (a dry run)
    page.click("#r-go")
    page.wait_for_selector("#r-error:has-text('order_id')")
    page.fill("#r-patch", '{"order_id": "B-3"}')
    page.wait_for_selector("#r-preview")
    page.click("#r-go")
    link = page.wait_for_selector("#r-link")
    link.click()
    page.wait_for_selector("#x-status:has-text('completed')", timeout=30_000)
    page.wait_for_selector(f"#x-meta:has-text('replay of {eid}')")


def test_read_only_key_sees_no_execution_controls(stack: Stack, browser: Browser, admin: str, reader: str) -> None:
    eid = start(stack, admin, "slow-then-done", {"n": 4})
    page = browser.page(key=reader)
    page.goto(f"{stack.url}/ui/executions/{eid}")
    page.wait_for_selector("#dag g.node")
    assert page.locator("[data-control]").count() == 0
    assert page.locator("#replay-form").count() == 0
    status = page.evaluate(f"async () => {{ try {{ await Weft.api('POST', '/v1/executions/{eid}/cancel', {{}}); }}"
                           " catch (e) { return e.status; } return 200; }")
    assert status == 403


FLAKY = """
name: flaky-backend
steps:
  - id: call
    type: python
    with: {callable: "tests.integration.steps:flaky"}
    input: {order: "${{ input.order }}", log: "${{ input.log }}", flag: "${{ input.flag }}"}
    retry: {max_attempts: 1}
  - {id: after, type: transform, needs: [call], with: {expression: "{done: `true`}"}}
output: "${{ steps.after.output }}"
"""


def test_dead_letter_fix_the_cause_and_reprocess_from_the_ui(stack: Stack, browser: Browser, admin: str,
                                                             tmp_path: Any) -> None:
    stack.publish(tmp_path / "flaky.yaml", FLAKY)
    flag = tmp_path / "backend-up"
    data = {"order": "C-1", "log": str(tmp_path / "calls.log"), "flag": str(flag)}
    eid = start(stack, admin, "flaky-backend", data)
    other = start(stack, admin, "flaky-backend", data | {"log": str(tmp_path / "other.log")})
    page = browser.page(key=admin)
    page.goto(f"{stack.url}/ui/executions/{eid}")
    page.wait_for_selector("#x-status:has-text('failed')", timeout=30_000)
    page.wait_for_selector("#dag g.node[data-step='call'][data-status='dead_lettered']")
    page.wait_for_selector("#dag g.node[data-step='after'][data-status='pending']")

    # The list, and the clusters by error.
    page.goto(f"{stack.url}/ui/deadletters?workflow=flaky-backend")
    page.wait_for_function("() => document.querySelectorAll('#deadletters tbody tr[data-id]').length === 2")
    page.select_option("#f-view", "clusters")
    page.click("#filters button")
    page.wait_for_selector("#clusters tbody tr:has-text('ConnectionError') td:first-child:text-is('2')")
    page.select_option("#f-view", "rows")
    page.click("#filters button")

    # The detail: error, traceback, payload, history around the failure.
    page.click(f"#deadletters tbody tr:has(a[href='/ui/executions/{eid}']) td a.mono >> nth=0")
    page.wait_for_selector("#dl-error pre.traceback:has-text('backend unreachable')")
    page.wait_for_selector("#history td:has-text('StepDeadLettered')")
    page.wait_for_selector("#dl-payload pre:has-text('backend-up')")
    page.click("#a-dry")
    page.wait_for_selector("#outcome-list li")
    assert page.locator("#outcomes h3").inner_text().startswith("Dry run")
    browser.shot(page, "dead-letter")

    # Fix the cause, reprocess from the UI, and the execution completes.
    flag.write_text("up")
    page.fill("#a-reason", "backend is back")
    page.click("#a-reprocess")
    page.wait_for_selector("#outcome-list li[data-outcome='reprocessed']")
    page.wait_for_selector("#dl-status:has-text('reprocessed')")
    page.click("#dl-execution")
    page.wait_for_selector("#x-status:has-text('completed')", timeout=30_000)
    page.wait_for_selector("#history td:has-text('StepReprocessRequested')")

    # The other one: discard by filter, which asks for a reason; one outcome per item.
    page.goto(f"{stack.url}/ui/deadletters?workflow=flaky-backend")
    page.wait_for_function("() => document.querySelectorAll('#deadletters tbody tr[data-id]').length === 1")
    page.select_option("#a-target", "filter")
    page.uncheck("#a-dry")
    page.click("#a-discard")
    page.wait_for_selector("#act-error:has-text('reason')")
    page.fill("#a-reason", "test data")
    page.click("#a-discard")
    page.wait_for_selector("#outcome-list li[data-outcome='discarded']")
    assert page.locator("#outcome-list li").count() == 1
    page.wait_for_selector("#deadletters td.empty")
    del other
    assert not browser.errors, browser.errors


def test_read_only_key_sees_no_dead_letter_actions(stack: Stack, browser: Browser, reader: str) -> None:
    page = browser.page(key=reader)
    page.goto(f"{stack.url}/ui/deadletters")
    page.wait_for_selector("#deadletters tbody tr")
    assert page.locator("#actions").count() == 0
    assert page.locator("#deadletters .pick").count() == 0


def test_workflows_versions_diff_stats_and_a_backfill_with_progress(stack: Stack, browser: Browser, admin: str,
                                                                    tmp_path: Any) -> None:
    v2 = (Path(ROOT) / "examples/order.yaml").read_text().replace("initial_delay: 0.1}", "initial_delay: 0.15}")
    stack.publish(tmp_path / "order-v2.yaml", v2)
    stack.weft("publish", "order.created", "--data", '{"order_id": "T-1", "items": ["kiwi"]}', "--id", "evt-console-1")
    page = browser.page(key=admin)
    page.goto(f"{stack.url}/ui/workflows")
    page.wait_for_selector("#workflows tr[data-workflow='order-fulfilment']")
    page.click("#workflows a:text-is('order-fulfilment')")
    page.wait_for_selector("#stats-line:has-text('p95')")
    assert page.locator("#versions tbody tr").count() == 2
    page.click("#diff-form button")
    page.wait_for_selector("#diff-summary:has-text('changed lines (1 → 2)')")
    page.wait_for_selector("#diff pre.add:has-text('0.15')")
    page.wait_for_selector("#diff pre.del:has-text('initial_delay')")

    page.click("#b-dry")
    page.wait_for_selector("#b-summary:has-text('Dry run')")
    page.wait_for_selector("#b-result li[data-outcome='would_start']")
    page.click("#b-go")
    page.wait_for_selector("#b-summary:has-text('Backfill')")
    started = page.locator("#b-result li[data-outcome='started']").count()
    assert started >= 1, page.inner_text("#b-result")
    page.wait_for_selector(f"#b-progress:has-text('{started} of {started} finished')", timeout=30_000)
    browser.shot(page, "workflow")
    assert not browser.errors, browser.errors


def test_projections_position_lag_and_rebuild(stack: Stack, browser: Browser, admin: str) -> None:
    page = browser.page(key=admin)
    page.goto(f"{stack.url}/ui/projections")
    page.wait_for_selector("#projections tr[data-view='executions'] td.position")
    page.click("#projections tr[data-view='timeline'] button[data-rebuild]")
    page.wait_for_selector("#projections tr[data-view='timeline'] td.rebuilt:has-text('gen')", timeout=30_000)
    assert not browser.errors, browser.errors


def test_a_key_bound_to_one_workflow_is_offered_that_workflow_only(stack: Stack, browser: Browser, admin: str) -> None:
    start(stack, admin, "order-fulfilment", {"order_id": "Z-9", "items": []})
    start(stack, admin, "slow-then-done", {"n": 9})
    bound = stack.key("trigger,read", "--workflows", "slow-then-done", "--name", "bound")
    page = browser.page(key=bound)
    page.goto(f"{stack.url}/ui/executions")
    page.wait_for_selector("#who:has-text('workflows: slow-then-done')")
    page.wait_for_selector("#executions tbody tr[data-id]")
    workflows = page.eval_on_selector_all("#executions tbody tr[data-id] td:nth-child(2)", "tds => tds.map(t => t.textContent)")
    assert workflows and all(w.startswith("slow-then-done@") for w in workflows)
    offered = page.eval_on_selector_all("#s-workflow option", "os => os.map(o => o.value)")
    assert offered == ["slow-then-done"]
    page.goto(f"{stack.url}/ui/workflows")
    page.wait_for_selector("#workflows tbody tr")
    assert page.eval_on_selector_all("#workflows tbody tr", "rs => rs.map(r => r.dataset.workflow)") == ["slow-then-done"]
    page.goto(f"{stack.url}/ui/projections")
    page.wait_for_selector("#projections tbody tr")
    assert page.locator("button[data-rebuild]").count() == 0


SKIPPING = """
name: skipping
steps:
  - {id: a, type: noop}
  - {id: b, type: noop, needs: [a], when: "${{ input.go }}"}
  - {id: c, type: noop, needs: [b]}
"""


def test_skipped_branches_are_greyed(stack: Stack, browser: Browser, admin: str, tmp_path: Any) -> None:
    stack.publish(tmp_path / "skipping.yaml", SKIPPING)
    eid = start(stack, admin, "skipping", {"go": False})
    page = browser.page(key=admin)
    page.goto(f"{stack.url}/ui/executions/{eid}")
    page.wait_for_selector("#x-status:has-text('completed')", timeout=30_000)
    page.wait_for_selector("#dag g.node.n-skipped[data-step='b']")
    page.wait_for_selector("#dag g.node.n-skipped[data-step='c']")
    assert page.locator("#dag path.edge.off").count() == 2
    assert page.eval_on_selector("#dag g.node[data-step='c']", "g => getComputedStyle(g).opacity") == "0.55"
