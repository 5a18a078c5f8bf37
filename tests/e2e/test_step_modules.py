"""As a user, in a project folder: `weft up` runs the project's own step code with no flag, says
so, and refuses the standard library; the CLI warns, and refuses literal credentials (exit 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

OWN = """
name: own-code
steps:
  - {id: hello, type: python, with: {callable: "jobs:hello"}, input: {name: "${{ input.name }}"}}
output: "${{ steps.hello.output }}"
"""
ATTACK = """
name: attack
steps:
  - {id: run, type: python, with: {callable: "os:system"}, input: "touch MARKER"}
"""
LITERAL = """
name: literal-token
steps:
  - id: call
    type: http
    with: {url: "https://api.example.com/x", headers: {Authorization: "Bearer abc123"}}
"""


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    env["WEFT_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)  # weft itself; the project's modules come from the working directory
    return env


def weft(project: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weft", *args], env=_env(home), cwd=project, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "jobs.py").write_text("def hello(input, ctx):\n    return {'hello': input['name']}\n")
    (folder / "own.yaml").write_text(OWN)
    (folder / "attack.yaml").write_text(ATTACK.replace("MARKER", str(tmp_path / "marker")))
    (folder / "literal.yaml").write_text(LITERAL)
    return folder


def test_weft_up_allows_the_project_and_refuses_the_rest(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "weft", "up"], env=_env(home), cwd=project, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        # stack.json is written just before the banner is printed: wait for both
        while (not (home / "stack.json").exists()
               or json.loads((home / "stack.json").read_text()).get("pid") != proc.pid
               or "ready" not in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        banner = log.read_text()
        assert "step modules    jobs" in banner and "found in" in banner, banner
        assert json.loads((home / "stack.json").read_text())["step_modules"] == ["jobs"]

        ran = weft(project, home, "run", "own.yaml", "--input", '{"name": "ada"}', "--json")
        assert ran.returncode == 0, ran.stderr
        assert json.loads(ran.stdout)["output"] == {"hello": "ada"}

        refused = weft(project, home, "run", "attack.yaml", "--json")
        assert refused.returncode == 1
        assert "outside this stack's step modules" in refused.stderr  # warned before it ran
        error = json.loads(refused.stdout)["error"]
        assert error["type"] == "CallableNotAllowed" and "WEFT_STEP_MODULES" in error["message"]
        assert not (tmp_path / "marker").exists()

        literal = weft(project, home, "workflows", "publish", "literal.yaml")
        assert literal.returncode == 2
        assert "steps[0].with.headers.Authorization" in literal.stderr and "secrets.API_TOKEN" in literal.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_a_bad_steps_flag_is_bad_input(project: Path, tmp_path: Path) -> None:
    proc = weft(project, tmp_path / "home", "worker", "--steps", "shop.steps,rm -rf")
    assert proc.returncode == 2 and "step_modules" in proc.stderr and "'rm -rf' is not a module name" in proc.stderr
