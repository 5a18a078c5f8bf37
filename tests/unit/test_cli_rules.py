"""Issue 16 part 2 item 4: one rule each, applied by every command.

- NAME@VERSION names a workflow everywhere a command takes one;
- not found (no execution, workflow, version, dead letter or key by that id or name) exits 3, everywhere;
- control commands (cancel, pause, resume, retry) print one line for a person, JSON only with --json;
- `run --no-wait` prints just the execution id (the object with --json).

A store in a temporary home stands in for the stack: stack.json names this process, so the commands
find a "running" stack and use its SQLite store (no broker is needed by these commands).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from weft.cli import app
from weft.cli.common import NOT_FOUND

ROOT = Path(__file__).resolve().parents[2]
INVOICE = str(ROOT / "examples/invoice.yaml")
INPUT = '{"order_id": "A-1", "lines": [{"amount": 12}, {"amount": 30}]}'


@pytest.fixture
def weft(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from services.settings import write_stack

    for name in ("WEFT_DATABASE_URL", "WEFT_NATS_URL", "WEFT_HOME"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    write_stack(home, {"pid": os.getpid()})
    runner = CliRunner()

    def run(*args: str, code: int | None = 0):
        result = runner.invoke(app, list(args), env={"WEFT_HOME": str(home), "COLUMNS": "200"})
        if code is not None:
            assert result.exit_code == code, (args, result.exit_code, result.output)
        return result

    return run


def _two_versions(weft, tmp_path: Path) -> None:
    weft("workflows", "publish", INVOICE)
    v2 = tmp_path / "invoice2.yaml"
    v2.write_text(Path(INVOICE).read_text().replace("lines: lines}", "lines: lines, v: `2`}"))
    weft("workflows", "publish", str(v2))


def test_name_at_version_works_in_every_command_that_takes_a_workflow(weft, tmp_path: Path) -> None:
    """Issue 16 part 2 item 4: `weft workflows show invoice@2` and NAME@VERSION everywhere."""
    _two_versions(weft, tmp_path)
    assert json.loads(weft("workflows", "show", "invoice@1", "--json").output)["version"] == 1
    assert json.loads(weft("workflows", "show", "invoice@2", "--json").output)["version"] == 2
    assert json.loads(weft("workflows", "show", "invoice", "--json").output)["version"] == 2
    weft("workflows", "show", "invoice@2", "--version", "1", code=2)  # they disagree
    weft("workflows", "show", "invoice@two", code=2)
    # run a published workflow by name, at a version
    first = json.loads(weft("run", "invoice@1", "--input", INPUT, "--no-wait", "--json").output)
    assert first["version"] == 1 and first["workflow"] == "invoice"
    latest = json.loads(weft("run", "invoice", "--input", INPUT, "--no-wait", "--json").output)
    assert latest["version"] == 2
    listed = json.loads(weft("executions", "list", "--workflow", "invoice@1", "--json").output)
    assert [r["id"] for r in listed] == [first["execution_id"]]
    assert len(json.loads(weft("executions", "list", "--workflow", "invoice", "--json").output)) == 2
    weft("workflows", "stats", "invoice@2", "--json")
    weft("dlq", "list", "--workflow", "invoice@2", "--json")
    weft("replay", "--filter", "workflow=invoice@1", "--dry-run", "--json")
    bulk = json.loads(weft("replay", "--filter", "workflow=invoice@1", "--dry-run", "--json").output)
    assert bulk["filter"] == "version=1,workflow=invoice" and bulk["total"] == 1
    weft("backfill", "--workflow", "invoice@2", "--from", "1h", "--to", "now", "--dry-run", "--json")


@pytest.mark.parametrize("args", [
    ("status", "X"), ("history", "X"), ("history", "X", "--at", "1"), ("cancel", "X"), ("pause", "X"),
    ("resume", "X"), ("retry", "X"), ("executions", "attempts", "X"), ("executions", "timeline", "X"),
    ("replay", "X"), ("workflows", "show", "ghost"), ("workflows", "show", "invoice@9"),
    ("workflows", "stats", "ghost"), ("workflows", "stats", "invoice@9"), ("run", "ghost"), ("run", "invoice@9"),
    ("executions", "list", "--workflow", "invoice@9"), ("dlq", "list", "--workflow", "invoice@9"),
    ("executions", "list", "--workflow", "ghost"), ("dlq", "list", "--workflow", "ghost"),
    ("dlq", "show", "00a0763f"), ("dlq", "reprocess", "00a0763f"), ("dlq", "discard", "00a0763f", "--reason", "x"),
    ("backfill", "--workflow", "ghost", "--from", "1h", "--to", "now"),
    ("backfill", "--workflow", "invoice@9", "--from", "1h", "--to", "now"),
    ("replay", "--filter", "workflow=invoice@9"),
    ("keys", "revoke", "weft_12345678"),
], ids=lambda a: " ".join(a))
def test_not_found_exits_3_everywhere(weft, args: tuple[str, ...]) -> None:
    """Issue 16 part 2 item 4: an id or name that names nothing exits 3 (NOT_FOUND) in every command."""
    weft("workflows", "publish", INVOICE)
    args = tuple(str(uuid.uuid4()) if a == "X" else a for a in args)
    result = weft(*args, code=None)
    assert result.exit_code == NOT_FOUND, (args, result.exit_code, result.output)
    assert "error:" in result.output


def test_a_malformed_id_is_bad_input_not_not_found(weft) -> None:
    """Issue 16 part 2 item 4: exit 2 is bad input (a malformed id), 3 a well-formed one that names nothing."""
    assert weft("status", "not-an-id", code=2)
    assert weft("status", str(uuid.uuid4()), code=NOT_FOUND)


def test_control_commands_print_a_line_and_json_only_with_json(weft) -> None:
    """Issue 16 part 2 item 4: cancel/pause/resume/retry print a human line; --json prints JSON."""
    eid = weft("run", INVOICE, "--input", INPUT, "--no-wait").output.strip()
    paused = weft("pause", eid).output
    assert paused.strip().splitlines() == [f"execution {eid} · paused · recorded: ExecutionPaused"], paused
    assert "{" not in paused
    resumed = json.loads(weft("resume", eid, "--json").output)
    assert resumed["status"] == "running" and resumed["events"] == ["ExecutionResumed"]
    cancelled = weft("cancel", eid).output
    assert cancelled.startswith(f"execution {eid} · cancelled") and "{" not in cancelled
    again = weft("retry", eid, code=1)  # a cancelled execution cannot be retried: the operation failed
    assert "error:" in again.output and "{" not in again.output


def test_no_wait_prints_just_the_id(weft) -> None:
    """Issue 16 part 2 item 4: `--no-wait` prints the id, as its help says; --json the object."""
    printed = weft("run", INVOICE, "--input", INPUT, "--no-wait").output
    assert str(uuid.UUID(printed.strip())) == printed.strip() and printed.count("\n") == 1
    as_json = json.loads(weft("run", INVOICE, "--input", INPUT, "--no-wait", "--json").output)
    assert set(as_json) == {"execution_id", "status", "workflow", "version"}


@pytest.mark.parametrize("width", [40, 60, 80, 100, 160])
def test_a_fitted_table_never_cuts_an_id(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    """Issue 16 part 2 item 5: at any width each id is printed whole on one line; columns fold, drop (said on
    stderr), the box goes, and at last each row becomes `header  value` lines."""
    import io

    from rich.console import Console

    from weft.cli import output as out

    screen, said = io.StringIO(), io.StringIO()
    monkeypatch.setattr(out, "console", Console(file=screen, width=width, color_system=None))
    monkeypatch.setattr(out, "errors", Console(file=said, width=width, color_system=None))
    ids = [str(uuid.uuid4()) for _ in range(4)]
    cols = [out.Col("source", key=True), out.Col("outcome"), out.Col("replay", key=True),
            out.Col("note", drop=1)]
    out.fitted(cols, [[ids[0], "started", ids[1], "a long note " * 5], [ids[2], "skipped", ids[3], ""]])
    lines = screen.getvalue().splitlines()
    for eid in ids:
        assert any(eid in line for line in lines), screen.getvalue()
    assert all(len(line) <= max(width, 36 + 8) for line in lines), screen.getvalue()
    if width < 100:
        assert "not shown at this width: note" in " ".join(said.getvalue().split())
