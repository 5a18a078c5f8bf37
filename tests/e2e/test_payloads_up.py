"""End to end through `weft up`: a 20 MiB value passes from one step to the next, and a
2 MiB `--input @file` completes; a normal run completes right after."""

from __future__ import annotations

import json
import time
from pathlib import Path

import orjson
import pytest

from tests.e2e.test_weft_up import Up, up, weft  # noqa: F401 - the fixture
from tests.integration.test_payloads import BIG, ECHO, TAKE

pytestmark = pytest.mark.e2e
MIB = 1024 * 1024


def test_a_20_mib_value_passes_from_one_step_to_the_next(up: Up, tmp_path: Path) -> None:  # noqa: F811
    wf = tmp_path / "big.yaml"
    wf.write_text(BIG)
    started = time.monotonic()
    done = weft(up.home, "run", str(wf), "--input", json.dumps({"size": 20 * MIB}), "--json", "--timeout", "120",
                timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and result["output"]["bytes"] > 20 * MIB
    took = time.monotonic() - started

    take, big = tmp_path / "take.yaml", tmp_path / "big.json"
    take.write_text(TAKE)
    data = {"items": ["y" * 1000] * 2100}
    big.write_bytes(orjson.dumps(data))
    done = weft(up.home, "run", str(take), "--input", f"@{big}", "--json", "--timeout", "60", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["output"]["bytes"] == len(orjson.dumps(data))

    small = tmp_path / "small.yaml"
    small.write_text(ECHO)
    t0 = time.monotonic()
    done = weft(up.home, "run", str(small), "--input", '{"k": 1}', "--json", "--timeout", "20", timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["output"] == 7
    assert time.monotonic() - t0 < 15
    assert up.proc.poll() is None, "weft up died"
    print(f"20 MiB through two steps in {took:.1f}s")
