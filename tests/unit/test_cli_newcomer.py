"""No dead ends for a newcomer (issue 16, part 2): commands that need a stack say at once
that none is running, create nothing and exit non-zero; --version; YAML errors in full."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from weft.cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for name in ("WEFT_DATABASE_URL", "WEFT_NATS_URL", "WEFT_HOME"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [*args], env={"WEFT_HOME": str(home)}, catch_exceptions=False)

    run.home = home  # type: ignore[attr-defined]
    return run


X = str(uuid.uuid4())
ORDER = str(ROOT / "examples/order.yaml")
# Every command that needs a running stack (issue 16 part 2 item 1). test_every_stack_command_is_listed
# holds this list to the app's commands, so a new command cannot be forgotten here.
NEEDS_STACK: list[tuple[str, ...]] = [
    ("run", ORDER, "--input", '{"order_id": "A-1", "items": []}'),
    ("status", X), ("history", X), ("history", X, "--at", "1"),
    ("cancel", X), ("pause", X), ("resume", X), ("retry", X),
    ("executions", "list"), ("executions", "attempts", X), ("executions", "timeline", X),
    ("workflows", "publish", ORDER), ("workflows", "list"), ("workflows", "show", "invoice"),
    ("workflows", "show", "invoice@2"), ("workflows", "stats"),
    ("dlq", "list"), ("dlq", "show", "00a0763f"), ("dlq", "reprocess", "00a0763f"),
    ("dlq", "discard", "00a0763f", "--reason", "x"), ("dlq", "watch"), ("dlq", "stats"),
    ("projections", "status"), ("projections", "rebuild", "all"),
    ("replay", X), ("replay", "--filter", "workflow=invoice"),
    ("backfill", "--workflow", "invoice@2", "--from", "24h", "--to", "now"),
    ("publish", "order.created", "--data", '{"order_id": "A-1"}'), ("trigger-types",),
    ("keys", "create", "--scopes", "read"), ("keys", "list"), ("keys", "revoke", "weft_12345678"),
    ("keys", "bootstrap"),
]
# Commands that run without a stack: they start one (up, the services), or need none.
NO_STACK = {"up", "orchestrator", "relay", "projector", "worker", "gateway", "triggers", "scheduler", "deadletters",
            "broker init", "broker config"}


@pytest.mark.parametrize("args", NEEDS_STACK, ids=lambda a: " ".join(a[:3]))
def test_a_command_that_needs_the_stack_says_none_is_running(cli, args: tuple[str, ...]) -> None:
    """Issue 16 part 2 item 1: one line saying no stack runs and how to start one, a non-zero exit,
    and nothing created (no ./.weft, no weft.db)."""
    result = cli(*args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output  # one line (soft-wrapped: never broken by the terminal width)
    assert "no Weft stack is running" in lines[0] and "start one with `weft up`" in lines[0], result.output
    assert not cli.home.exists() or not any(cli.home.iterdir()), list(cli.home.iterdir())  # nothing created


def _commands(group, prefix: str = "") -> set[str]:
    import typer.main

    found = set()
    click_group = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, command in click_group.commands.items():
        if hasattr(command, "commands"):
            found |= _commands(command, f"{prefix}{name} ")
        else:
            found.add(f"{prefix}{name}")
    return found


def test_every_stack_command_is_listed() -> None:
    """Issue 16 part 2 item 1: every command of the app is either in NEEDS_STACK or known not to need one."""
    listed = {" ".join(a[:2]) if a[0] in {"executions", "workflows", "dlq", "projections", "keys", "broker"} else a[0]
              for a in NEEDS_STACK}
    assert _commands(app) - NO_STACK == listed


def test_a_stale_stack_file_is_named(cli) -> None:
    """Issue 16 part 2 item 1: a stack.json left by a `weft up` that died is named, and nothing is created."""
    cli.home.mkdir()
    (cli.home / "stack.json").write_text(json.dumps({"pid": 2**22 + 12345, "nats_url": "nats://127.0.0.1:1"}))
    result = cli("executions", "list")
    assert result.exit_code == 1
    assert "is no longer running" in " ".join(result.output.split())
    assert not (cli.home / "weft.db").exists()


def test_version(cli) -> None:
    """Issue 16 part 2 item 6: `weft --version`."""
    result = cli("--version")
    assert result.exit_code == 0 and result.output.startswith("weft ")


def test_a_yaml_error_says_what_was_expected(cli, tmp_path: Path) -> None:
    """Issue 16 part 2 item 6: YAML errors carry PyYAML's full "expected ..." detail."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - {id: a, type: noop\n")
    result = cli("workflows", "publish", str(bad))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "while parsing a flow mapping (line 3, column 5): expected ',' or '}'" in text, result.output


def test_run_with_a_used_idempotency_key_and_another_input_is_refused(monkeypatch, tmp_path: Path) -> None:
    """Issue 16 part 2 item 4: `run --idempotency-key` with another input is refused (exit 2), as HTTP answers 409."""
    from services.settings import write_stack

    for name in ("WEFT_DATABASE_URL", "WEFT_NATS_URL"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    import os

    write_stack(home, {"pid": os.getpid()})  # a stack "runs": this process stands in for `weft up`
    runner = CliRunner()
    wf = str(ROOT / "examples/order.yaml")
    first = runner.invoke(app, ["run", wf, "--input", '{"order_id": "A-1"}', "--idempotency-key", "k1", "--no-wait",
                                "--json"], env={"WEFT_HOME": str(home)})
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["run", wf, "--input", '{"order_id": "A-1"}', "--idempotency-key", "k1", "--no-wait",
                                "--json"], env={"WEFT_HOME": str(home)})
    assert again.exit_code == 0 and json.loads(again.output)["execution_id"] == json.loads(first.output)["execution_id"]
    other = runner.invoke(app, ["run", wf, "--input", '{"order_id": "B-2"}', "--idempotency-key", "k1", "--no-wait"],
                          env={"WEFT_HOME": str(home)})
    assert other.exit_code == 2 and "different input" in " ".join(other.output.split())
