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


@pytest.mark.parametrize("args", [
    ("status", str(uuid.uuid4())),
    ("history", str(uuid.uuid4())),
    ("executions", "list"),
    ("dlq", "list"),
    ("projections", "status"),
    ("workflows", "list"),
    ("run", str(ROOT / "examples/order.yaml"), "--input", '{"order_id": "A-1", "items": []}'),
])
def test_a_command_that_needs_the_stack_says_none_is_running(cli, args: tuple[str, ...]) -> None:
    result = cli(*args)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "no Weft stack is running" in text and "weft up" in text, result.output
    assert not cli.home.exists() or not any(cli.home.iterdir()), list(cli.home.iterdir())  # nothing created


def test_a_stale_stack_file_is_named(cli) -> None:
    cli.home.mkdir()
    (cli.home / "stack.json").write_text(json.dumps({"pid": 2**22 + 12345, "nats_url": "nats://127.0.0.1:1"}))
    result = cli("executions", "list")
    assert result.exit_code == 1
    assert "is no longer running" in " ".join(result.output.split())
    assert not (cli.home / "weft.db").exists()


def test_version(cli) -> None:
    result = cli("--version")
    assert result.exit_code == 0 and result.output.startswith("weft ")


def test_a_yaml_error_says_what_was_expected(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - {id: a, type: noop\n")
    result = cli("workflows", "publish", str(bad))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "while parsing a flow mapping (line 3, column 5): expected ',' or '}'" in text, result.output


def test_run_with_a_used_idempotency_key_and_another_input_is_refused(monkeypatch, tmp_path: Path) -> None:
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
