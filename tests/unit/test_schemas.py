"""The checked-in JSON Schemas (contracts/schemas/*.json) match the pydantic models."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from contracts import events as ev
from contracts import schemas
from contracts.definitions import parse_definition
from contracts.messages import StepError, StepReady, StepResult
from tests.unit.test_definitions import DESIGN_EXAMPLE

NOW = datetime(2024, 5, 1, tzinfo=timezone.utc)


def test_the_checked_in_schemas_are_up_to_date() -> None:
    problems = schemas.stale()
    assert not problems, (
        "the JSON Schemas in contracts/schemas/ do not match the pydantic models:\n  "
        + "\n  ".join(problems)
        + f"\nregenerate them with: {schemas.REGENERATE}  (and commit the result)"
    )


def test_every_event_and_message_has_a_schema() -> None:
    names = set(schemas.rendered())
    assert {f"{t}.json" for t in ev.EVENT_TYPES} <= names
    assert {"WorkflowDef.json", "Event.json", "StepReady.json", "StepResult.json"} <= names
    assert len(names) == len(ev.EVENT_TYPES) + 4


def test_files_are_pretty_sorted_and_end_with_a_newline() -> None:
    for name, text in schemas.rendered().items():
        assert text.endswith("}\n") and not text.endswith("\n\n"), name
        data = json.loads(text)
        assert text == json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        assert data["$schema"] == schemas.DIALECT
        jsonschema.Draft202012Validator.check_schema(data)


def test_generation_is_deterministic() -> None:
    assert schemas.rendered() == schemas.rendered()


def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((schemas.SCHEMA_DIR / name).read_text(encoding="utf-8")))


def test_the_design_example_is_valid_against_the_definition_schema() -> None:
    wf = parse_definition(DESIGN_EXAMPLE)
    _validator("WorkflowDef.json").validate(wf.canonical())
    errors = list(_validator("WorkflowDef.json").iter_errors({"name": "w", "steps": [{"id": "a", "type": "noop", "bogus": 1}]}))
    assert errors


SAMPLE_EVENTS: list[Any] = [
    ev.ExecutionStarted(at=NOW, workflow="w", version=1, content_hash="sha256:x", definition={"name": "w"}, input={"a": 1}),
    ev.StepMapped(at=NOW, step_id="m", count=2),
    ev.StepScheduled(at=NOW, step_id="a", attempt=1, step_type="noop", idempotency_key="e:a", not_before=NOW),
    ev.StepSucceeded(at=NOW, step_id="a", item=0, attempt=1, output=[1]),
    ev.StepFailed(at=NOW, step_id="a", attempt=1, error_type="E", error_message="m"),
    ev.StepSkipped(at=NOW, step_id="a", reason="when was false"),
    ev.StepDeadLettered(at=NOW, step_id="a", attempt=3, error_type="E", error_message="m", reason="retries exhausted"),
    ev.StepResultIgnored(at=NOW, step_id="a", attempt=1, outcome="succeeded", reason="stale attempt"),
    ev.StepReprocessRequested(at=NOW, step_id="a", patch={"x": None}),
    ev.ExecutionCompleted(at=NOW, output={"ok": True}),
    ev.ExecutionFailed(at=NOW, step_id="a", error_type="E", error_message="m"),
    ev.ExecutionCancelled(at=NOW),
    ev.ExecutionPaused(at=NOW),
    ev.ExecutionResumed(at=NOW),
    ev.ExecutionRetried(at=NOW),
]


@pytest.mark.parametrize("event", SAMPLE_EVENTS, ids=lambda e: e.type)
def test_stored_events_are_valid_against_their_schemas(event: Any) -> None:
    stored = json.loads(ev.encode(event))
    _validator(f"{event.type}.json").validate(stored)
    _validator("Event.json").validate(stored)
    wrong = {**stored, "type": "NoSuchEvent"}
    assert list(_validator("Event.json").iter_errors(wrong))


def test_sample_events_cover_every_event_type() -> None:
    assert {e.type for e in SAMPLE_EVENTS} == set(ev.EVENT_TYPES)


def test_messages_are_valid_against_their_schemas() -> None:
    ready = StepReady(
        execution_id="e", workflow="w", step_id="a", attempt=1, step_type="noop", idempotency_key="e:a", scheduled_at=NOW
    )
    _validator("StepReady.json").validate(json.loads(ready.encode()))
    result = StepResult(execution_id="e", step_id="a", attempt=1, status="failed", error=StepError(type="E", message="m"))
    _validator("StepResult.json").validate(json.loads(result.encode()))
    assert list(_validator("StepResult.json").iter_errors({**json.loads(result.encode()), "status": "maybe"}))


def test_check_and_regenerate_in_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "StepResult.json (missing)" in err and schemas.REGENERATE in err
    assert schemas.main(["--dir", str(tmp_path)]) == 0
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(schemas.rendered())
    (tmp_path / "StepReady.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "Gone.json").write_text("{}\n", encoding="utf-8")
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "StepReady.json (out of date)" in err and "Gone.json (no longer generated)" in err
    assert schemas.main(["--dir", str(tmp_path)]) == 0
    assert schemas.stale(tmp_path) == [] and not (tmp_path / "Gone.json").exists()


def test_runnable_as_a_module(tmp_path: Path) -> None:
    root = Path(schemas.__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "contracts.schemas", "--check", "--dir", str(tmp_path)]
    stale = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=60, check=False)
    assert stale.returncode == 1 and "python -m contracts.schemas" in stale.stderr
    subprocess.run(cmd[:-3] + ["--dir", str(tmp_path)], cwd=root, capture_output=True, timeout=60, check=True)
    fresh = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=60, check=False)
    assert fresh.returncode == 0, fresh.stderr
