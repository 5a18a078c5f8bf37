"""The README's transcripts, run as a newcomer would: `weft up` in a project folder that holds
the shipped `examples/`, then the README's commands against it. If a README demo needs a file,
it is under examples/, and this test uses it from there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


class Project:
    """A folder with a copy of examples/ and `weft up` running in it."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.home = folder, folder / ".weft"
        shutil.copytree(ROOT / "examples", folder / "examples", ignore=shutil.ignore_patterns("__pycache__"))
        self.log = folder / "up.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "weft", "up"], env=self.env(), cwd=folder,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "ready" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
        env["PYTHONPATH"] = str(ROOT)  # weft itself; the step code comes from the project folder
        env["ORDERS_SECRET"] = "s3cret"
        return env

    def weft(self, *args: str, code: int | None = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "weft", *args], env=self.env(), cwd=self.folder,
                              capture_output=True, text=True, timeout=90)
        if code is not None:
            assert done.returncode == code, f"weft {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def json(self, *args: str, code: int | None = 0) -> Any:
        return json.loads(self.weft(*args, "--json", code=code).stdout)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)


@pytest.fixture
def project(tmp_path: Path):
    p = Project(tmp_path / "yourdemo")
    try:
        yield p
    finally:
        p.stop()


def _until(check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_the_readme_transcripts(project: Project) -> None:
    # A workflow: the order example, with its retried parcel.
    order = project.json("run", "examples/order.yaml", "--input", '{"order_id": "A-1", "items": ["apple", "pear", "fig"]}')
    assert order["status"] == "completed"
    assert order["output"] == {"order": "A-1", "summary": {"parcels": ["P0-1", "P1-2", "P2-1"], "count": 3}}
    status = project.json("status", order["execution_id"])
    assert {s["id"] if "id" in s else s.get("step_id") for s in status["steps"]} >= {"reserve", "ship_each", "summary"}

    # Dead letters: the gateway is down, charge is dead-lettered; fix it; reprocess; completed.
    failed = project.json("run", "examples/checkout.yaml", "--input", '{"order": "A-1001", "amount": 42, "country": "FR"}',
                          code=1)
    assert failed["status"] == "failed" and "payment gateway unreachable" in json.dumps(failed)
    letters = _until(lambda: [d for d in project.json("dlq", "list") if d["execution_id"] == failed["execution_id"]])
    assert letters[0]["kind"] == "retries_exhausted" and letters[0]["step_id"] == "charge"
    (project.folder / "gateway-up").touch()
    project.weft("dlq", "reprocess", letters[0]["id"], "--why", "payment gateway is back")
    done = _until(lambda: project.json("status", failed["execution_id"])["status"] == "completed")
    assert done

    # Replay: invoice, from a step, with a patched input.
    invoice = project.json("run", "examples/invoice.yaml", "--input",
                           '{"order_id": "A-1", "lines": [{"amount": 12}, {"amount": 30}]}')
    assert invoice["output"] == {"order": "A-1", "total": 42, "lines": 2}
    replay = project.json("replay", invoice["execution_id"], "--from-step", "total", "--input-patch",
                          '{"order_id": "A-1-fixed"}', "--wait")
    assert replay["status"] == "completed" and replay["output"] == {"order": "A-1-fixed", "total": 42, "lines": 2}

    # Triggers: order-received subscribes to order.created (eu and uk only).
    project.weft("workflows", "publish", "examples/order-received.yaml")
    project.weft("publish", "order.created", "--data", '{"order_id": "A-1002", "region": "uk"}', "--source", "shop",
                 "--id", "ord-1002")
    started = _until(lambda: [e for e in project.json("executions", "list", "--workflow", "order-received")
                              if e["status"] == "completed"])
    assert len(started) == 1
