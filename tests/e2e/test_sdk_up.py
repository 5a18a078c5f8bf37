"""End to end, as a Python developer: the code-first example (examples/orders.py) through `weft up`,
published with `weft workflows publish module:attr`, started and awaited with weft.Client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import weft
from tests.e2e.test_weft_up import ROOT, Up, _env, weft as weft_cli

pytestmark = pytest.mark.e2e


class UpWithSteps(Up):
    def __init__(self, home: Path, *args: str):
        self.home = home
        self.log = home / f"up-{time.monotonic_ns()}.log"
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "weft", "up", *args], env=_env(home), cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"weft up did not start:\n{self.log.read_text()}")
            time.sleep(0.1)


def test_code_first_order_through_weft_up_with_the_client(tmp_path: Path) -> None:
    up = UpWithSteps(tmp_path / "home", "--steps", "examples.orders")
    try:
        shown = weft_cli(up.home, "workflows", "show", "examples.orders:orders", check=True)
        assert shown.stdout.startswith("# orders  sha256:") and "callable: examples.orders:reserve" in shown.stdout
        published = json.loads(weft_cli(up.home, "workflows", "publish", "examples.orders:orders", "--json",
                                        check=True).stdout)
        from examples.orders import orders

        assert published["content_hash"] == orders.content_hash()
        url = json.loads((up.home / "stack.json").read_text())["gateway_url"]
        with weft.Client(url) as client:
            run = client.start("orders", input={"order_id": "A-1", "items": ["book", "lamp"]}, idempotency_key="A-1")
            result = run.wait(timeout=30)
            assert result.status == "completed", result
            assert result.output == {"order": "A-1", "summary": {"parcels": ["P0-1", "P1-2"], "count": 2}}
        # the example's own entry point, as the README shows it (it finds the gateway in WEFT_HOME)
        proc = subprocess.run([sys.executable, "-m", "examples.orders"], env=_env(up.home), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("completed {'order': 'A-1'")
        ran = json.loads(weft_cli(up.home, "run", "examples.orders:orders", "--input", '{"order_id": "R-1"}',
                                  "--json", check=True).stdout)
        assert ran["status"] == "completed" and ran["output"] == {"order": "R-1", "summary": None}
        # a step function outside --steps is not run: refused by the allowlist, the order fails
        typed = weft_cli(up.home, "workflows", "publish", "tests.unit.test_sdk_workflow:typed_wf", "--json")
        assert typed.returncode == 0 and "outside this stack's step modules" in typed.stderr
        with weft.Client(url) as client:
            refused = client.start("typed", input={"order_id": "Z"}).wait(timeout=30)
        assert refused.status == "failed" and refused.error is not None
        assert refused.error.type == "CallableNotAllowed"
    finally:
        up.stop()
