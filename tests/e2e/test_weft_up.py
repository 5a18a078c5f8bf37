"""End to end, as a user: `weft up` as a subprocess, then the CLI against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

SLOW = """
name: slow-then-done
steps:
  - {id: wait, type: sleep, with: {seconds: 2}}
  - {id: done, type: transform, needs: [wait], with: {expression: "{ok: `true`}"}}
output: "${{ steps.done.output }}"
"""
FAILING = """
name: always-fails
steps:
  - id: boom
    type: python
    with: {callable: "tests.integration.steps:refuse"}
"""


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    env["WEFT_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)
    return env


def weft(home: Path, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "weft", *args], env=_env(home), cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"weft {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


class Up:
    def __init__(self, home: Path, *flags: str):
        self.home = home
        self.log = home / f"up-{time.monotonic_ns()}.log"
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "weft", "up", *flags], env=_env(home), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"weft up did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        stack = self.home / "stack.json"
        return stack.exists() and json.loads(stack.read_text()).get("pid") == self.proc.pid

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture(params=["nats", "kafka"])
def up(tmp_path: Path, request: pytest.FixtureRequest):
    """`weft up` on its embedded NATS, then on the session's Kafka (`--broker kafka://...`)."""
    flags = ("--broker", request.getfixturevalue("kafka_url")) if request.param == "kafka" else ()
    stack = Up(tmp_path / "home", *flags)
    yield stack
    stack.stop()


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def test_run_example_and_read_it_back(up: Up) -> None:
    broker = json.loads((up.home / "stack.json").read_text())["broker_url"]  # where every other command goes
    assert broker.startswith(("nats://", "kafka://"))
    proc = weft(up.home, "run", "examples/order.yaml", "--input", '{"order_id": "A-1", "items": ["apple", "pear"]}', "--json")
    assert proc.returncode == 0, proc.stderr
    result = _json(proc)
    assert result["status"] == "completed"
    assert result["output"] == {"order": "A-1", "summary": {"parcels": ["P0-1", "P1-2"], "count": 2}}
    eid = result["execution_id"]

    status = _json(weft(up.home, "status", eid, "--json", check=True))
    assert {s["step_id"]: s["status"] for s in status["steps"]} == {
        "reserve": "succeeded", "ship_each": "succeeded", "summary": "succeeded"}

    lines = [json.loads(line) for line in weft(up.home, "history", eid, "--json", check=True).stdout.splitlines()]
    assert [row["seq"] for row in lines] == list(range(1, len(lines) + 1))
    assert lines[0]["type"] == "ExecutionStarted" and lines[-1]["type"] == "ExecutionCompleted"

    as_of = _json(weft(up.home, "history", eid, "--at", "2", "--json", check=True))
    assert as_of["status"] == "running" and as_of["as_of"] == 2

    listed = _json(weft(up.home, "executions", "list", "--json", check=True))
    assert any(row["id"] == eid and row["status"] == "completed" for row in listed)


def test_bad_input_and_bad_definitions_exit_2_and_store_nothing(up: Up, tmp_path: Path) -> None:
    before = _json(weft(up.home, "executions", "list", "--json", check=True))
    proc = weft(up.home, "run", "examples/order.yaml", "--input", '{"items": 3}', "--json")
    assert proc.returncode == 2
    assert "order_id" in proc.stderr and "input.items" in proc.stderr
    assert weft(up.home, "run", "examples/order.yaml", "--input", "{not json").returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps:\n  - {id: a, type: noop, needs: [ghost]}\n")
    proc = weft(up.home, "run", str(bad))
    assert proc.returncode == 2 and "steps[0].needs[0] (line 3)" in proc.stderr
    assert _json(weft(up.home, "executions", "list", "--json", check=True)) == before
    assert _json(weft(up.home, "workflows", "list", "--json", check=True)) == []


def test_failed_execution_exits_1(up: Up, tmp_path: Path) -> None:
    wf = tmp_path / "failing.yaml"
    wf.write_text(FAILING)
    proc = weft(up.home, "run", str(wf), "--json")
    assert proc.returncode == 1
    result = _json(proc)
    assert result["status"] == "failed"
    assert result["error"] == {"step_id": "boom", "type": "NonRetryableError", "message": "refused"}


def test_restart_resumes_in_flight_executions(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = Up(home)
    wf = tmp_path / "slow.yaml"
    wf.write_text(SLOW)
    started = _json(weft(home, "run", str(wf), "--no-wait", "--json", check=True))
    time.sleep(0.5)  # the sleep step is running on the worker
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    second = Up(home)
    try:
        proc = weft(home, "run", str(wf), "--json")  # a second run, while the first resumes
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 60
        while True:
            status = _json(weft(home, "status", started["execution_id"], "--json", check=True))
            if status["status"] == "completed" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert status["status"] == "completed"
        assert status["output"] == {"ok": True}
    finally:
        assert second.stop() == 0
    assert not (home / "stack.json").exists()


def test_the_broker_requires_credentials_and_a_lone_worker_gets_its_role(tmp_path: Path) -> None:
    """`weft up` makes one password per broker role (0600), stack.json only points at them, an anonymous
    client is refused, and `weft worker --home` joins as the worker role (not admin) and does the work."""
    import socket
    import stat
    import urllib.request

    home = tmp_path / "home"
    up = Up(home, "--no-worker")
    worker = None
    try:
        stack = json.loads((home / "stack.json").read_text())
        users = stack["nats_users"]
        assert set(users) == {"admin", "worker", "orchestrator", "gateway", "publisher", "deadletters"}
        for path in users.values():
            assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
            assert Path(path).read_text().strip() not in (home / "stack.json").read_text()
        assert stat.S_IMODE((home / "nats" / "nats-server.conf").stat().st_mode) == 0o600

        host, port = stack["nats_url"].removeprefix("nats://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.recv(4096)  # INFO
            sock.sendall(b'CONNECT {"verbose":false}\r\nPUB weft.steps.python 2\r\n{}\r\nPING\r\n')
            assert sock.recv(4096).startswith(b"-ERR 'Authorization Violation'")

        with open(home / "worker.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "weft", "worker", "--steps", "examples"], env=_env(home),
                                      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        proc = weft(home, "run", "examples/order.yaml", "--input", '{"order_id": "A-9", "items": ["fig"]}', "--json",
                    "--timeout", "60")
        assert proc.returncode == 0, proc.stderr + (home / "worker.log").read_text()

        # An outside system sends events as `publisher`, which may do nothing else.
        env = {**_env(home), "WEFT_NATS_USER": "publisher", "WEFT_NATS_PASSWORD_FILE": users["publisher"]}
        sent = subprocess.run([sys.executable, "-m", "weft", "publish", "order.created", "--data", "{}", "--json"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0 and json.loads(sent.stdout)["duplicate"] is False, sent.stderr

        [ports] = (home / "nats").glob("*.ports")
        monitor = json.loads(ports.read_text())["monitoring"][0]
        with urllib.request.urlopen(f"{monitor}/connz?auth=true", timeout=5) as resp:
            users_connected = [c.get("authorized_user") for c in json.loads(resp.read())["connections"]]
        assert "worker" in users_connected and "admin" in users_connected, users_connected
        assert None not in users_connected
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
        up.stop()


BOMB = """
name: bomb
steps:
  - {id: blow, type: noop, input: {v: "${{ input.v""" + " | [@,@]" * 40 + """ }}"}}
"""


def test_an_expression_bomb_fails_its_step_and_weft_up_carries_on(up: Up, tmp_path: Path) -> None:
    # Issue 13: 327 characters that stand for 2^40 elements segfaulted `weft up` (orjson out of memory).
    wf = tmp_path / "bomb.yaml"
    wf.write_text(BOMB)
    started = time.monotonic()
    proc = weft(up.home, "run", str(wf), "--input", '{"v": "x"}', "--json")
    assert proc.returncode == 1, proc.stderr
    result = _json(proc)
    assert result["status"] == "failed" and result["error"]["step_id"] == "blow"
    assert result["error"]["type"] == "ExpressionBudgetError"
    assert "creates more than 1000000 elements (the expression budget)" in result["error"]["message"]
    assert time.monotonic() - started < 30
    assert up.proc.poll() is None  # alive
    letters = _json(weft(up.home, "dlq", "list", "--json", check=True))
    assert [(d["execution_id"], d["step_id"]) for d in letters] == [(result["execution_id"], "blow")]
    # values Weft cannot carry are refused at the door with the field, exit 2
    proc = weft(up.home, "run", str(wf), "--input", '{"v": 100000000000000000000000}', "--json")
    assert proc.returncode == 2 and "input.v" in proc.stderr and "64-bit" in proc.stderr, proc.stderr
    # and a normal execution completes right after
    proc = weft(up.home, "run", "examples/order.yaml", "--input", '{"order_id": "A-2", "items": ["fig"]}', "--json")
    assert proc.returncode == 0 and _json(proc)["status"] == "completed", proc.stderr


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_run_in_child_processes_and_die_with_a_killed_parent(tmp_path: Path) -> None:
    """`weft up --workers 2`: the steps run in two worker processes (not in weft up's), a worker that
    is killed is replaced, and SIGKILL of weft up leaves no worker process behind."""
    home = tmp_path / "home"
    up = Up(home, "--workers", "2")
    killed = False
    try:
        stack = json.loads((home / "stack.json").read_text())
        assert stack["worker_processes"] == 2 and "worker" not in stack["services"]
        deadline = time.monotonic() + 30
        while True:
            workers = {p for p in _children(up.proc.pid)
                       if b"worker" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")}
            if len(workers) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(workers) == 2
        proc = weft(home, "run", "examples/order.yaml", "--input", '{"order_id": "A-3", "items": ["fig", "kiwi"]}',
                    "--json", "--timeout", "60")
        assert proc.returncode == 0, proc.stderr + up.log.read_text()
        ran_on = {s["worker_id"] for s in (json.loads(line) for line in
                                           weft(home, "history", _json(proc)["execution_id"], "--json",
                                                check=True).stdout.splitlines())
                  if s["type"] == "StepSucceeded" and s.get("worker_id")}
        assert ran_on and all(int(w.rsplit(":", 1)[1]) in workers for w in ran_on), (ran_on, workers)

        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            now = {p for p in _children(up.proc.pid)
                   if _alive(p) and b"worker" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")}
            if (len(now) == 2 and victim not in now) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(now) == 2 and victim not in now, "a killed worker process was not replaced"

        up.proc.send_signal(signal.SIGKILL)
        up.proc.wait(timeout=10)
        killed = True
        deadline = time.monotonic() + 30  # each drains (SIGTERM) within its grace
        while any(_alive(p) for p in now) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in now), "worker processes outlived a SIGKILLed weft up"
    finally:
        if not killed:
            up.stop()


def test_an_unreachable_broker_is_named_at_once_and_nothing_starts(tmp_path: Path) -> None:
    """`weft up --broker kafka://...` on a port where nothing listens: one line naming the broker,
    exit 1 within seconds, and no stack.json that other commands would follow."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing answers there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "home"
    t0 = time.monotonic()
    proc = weft(home, "up", "--broker", f"kafka://127.0.0.1:{port}", timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - t0 < 20
    assert f"cannot connect to Kafka at 127.0.0.1:{port}" in proc.stderr
    assert "--broker" in proc.stderr
    assert not (home / "stack.json").exists()
