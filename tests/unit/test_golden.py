"""Golden histories: events recorded from real runs must keep folding to the same state.

tests/golden/<case>.jsonl holds an execution's events as stored (one encoded
event per line, recorded by tests/golden/record.py); <case>.expected.json the
state they folded into then. If a change to an event model, to `upcast` or to
`evolve` makes old data decode or fold differently, these tests say which
case, which line and what changed. Old data stays as it is: teach `upcast` to
read the old shape (and bump `schema_version`) rather than re-recording.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from contracts import events as ev
from services.orchestrator.state import fold, step_view
from services.projections import Projector, default_views, get_execution, step_runs, timeline
from services.store import NewEvent, open_store

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = sorted(GOLDEN.glob("*.jsonl"))
HOW_TO_FIX = (
    "An event change broke stored data: histories already stored keep their shape forever. "
    "Read the old shape in contracts/events.py:upcast (and bump schema_version) instead of changing "
    "what old events mean; re-record tests/golden only for a new case."
)


def _expected(path: Path) -> dict[str, Any]:
    return orjson.loads(path.with_name(path.stem + ".expected.json").read_bytes())


def _decode(path: Path) -> list[Any]:
    events = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        raw = orjson.loads(line)
        try:
            events.append(ev.decode(raw["type"], line.encode()))
        except Exception as exc:  # noqa: BLE001 - turned into a failure that says where
            pytest.fail(f"{path.name} line {n} ({raw.get('type')}, schema_version {raw.get('schema_version')}) "
                        f"no longer decodes:\n{exc}\n{HOW_TO_FIX}", pytrace=False)
    return events


def test_there_are_golden_histories_of_every_event_type() -> None:
    assert len(CASES) >= 5, "tests/golden/*.jsonl are missing: run tests/golden/record.py"
    kinds = {e.type for p in CASES for e in _decode(p)}
    missing = set(ev.EVENT_TYPES) - kinds
    assert not missing, f"no golden history has {sorted(missing)}: add a case to tests/golden/record.py"


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_a_golden_history_folds_to_its_recorded_state(path: Path) -> None:
    expected = _expected(path)
    events = _decode(path)
    state = fold(expected["execution_id"], events)
    got = {
        "execution_id": state.id, "workflow": state.workflow, "status": state.status, "output": state.output,
        "events": len(events), "steps": orjson.loads(orjson.dumps(step_view(state))),
    }
    problems = [f"{key}: recorded {expected[key]!r}, now {got[key]!r}"
                for key in ("workflow", "status", "output", "events") if got[key] != expected[key]]
    recorded = {s["step_id"]: s for s in expected["steps"]}
    for step in got["steps"]:
        was = recorded.pop(step["step_id"], None)
        if was is None:
            problems.append(f"step {step['step_id']}: not in the recorded state")
        elif was != step:
            changed = {k: (was.get(k), step.get(k)) for k in set(was) | set(step) if was.get(k) != step.get(k)}
            problems.append(f"step {step['step_id']}: (recorded, now) {changed}")
    problems += [f"step {sid}: recorded, now missing" for sid in recorded]
    assert not problems, f"{path.name} folds differently:\n  " + "\n  ".join(problems) + f"\n{HOW_TO_FIX}"


def test_golden_histories_build_the_views(tmp_path: Path) -> None:
    """The status views accept old data too: every golden history projects without error."""
    store = open_store(f"sqlite:///{tmp_path / 'golden.db'}")
    try:
        cases = {p.stem: (_expected(p), p.read_text().splitlines()) for p in CASES}
        for expected, lines in cases.values():
            sid = uuid.UUID(expected["execution_id"])
            store.append([NewEvent(sid, n, orjson.loads(line)["type"], line.encode())
                          for n, line in enumerate(lines, 1)])
        Projector(store, default_views(), batch=7).catch_up()
        with store.transaction() as tx:
            for name, (expected, lines) in cases.items():
                row = get_execution(tx, expected["execution_id"])
                assert row is not None, name
                assert (row["status"], row["output"], row["events"]) == \
                    (expected["status"], expected["output"], expected["events"]), name
                assert len(timeline(tx, expected["execution_id"])) == len(lines), name
                attempts = {(r["step_id"], r["attempt"]) for r in step_runs(tx, expected["execution_id"])}
                assert max((s["attempts"] for s in expected["steps"]), default=0) <= \
                    max((a for _, a in attempts), default=0), name
    finally:
        store.close()
