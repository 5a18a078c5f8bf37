"""The README's transcripts, run as a newcomer would: `weft up` in a project folder that holds
the shipped `examples/`, then the README's commands against it. If a README demo needs a file,
it is under examples/, and this test uses it from there."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_nats import unique_namespace
from tests.readme_transcripts import SKIPPED, files_used, readme_commands

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


class Project:
    """A folder with a copy of examples/ and `weft up` running in it: on its embedded NATS, or with
    `kafka` (a kafka:// URL) as `weft up --broker kafka://...` on an existing Kafka."""

    def __init__(self, folder: Path, kafka: str | None = None) -> None:
        self.folder, self.home, self.kafka = folder, folder / ".weft", kafka
        # The session's Tansu is shared by every Kafka test: a namespace of its own keeps this stack's
        # topics and consumer groups apart from theirs (and theirs from the events published here).
        self.namespace = unique_namespace() if kafka else ""
        shutil.copytree(ROOT / "examples", folder / "examples", ignore=shutil.ignore_patterns("__pycache__"))
        self.log = folder / "up.log"
        with open(self.log, "wb") as log:
            flags = ["--broker", kafka] if kafka else []
            self.proc = subprocess.Popen([sys.executable, "-m", "weft", "up", *flags], env=self.env(), cwd=folder,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "ready" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
        env["PYTHONPATH"] = str(ROOT)  # weft itself; the step code comes from the project folder
        env["ORDERS_SECRET"] = "s3cret"
        if self.namespace:  # every command of the project, `weft up` included, on the same topics
            env["WEFT_NAMESPACE"] = self.namespace
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


@pytest.fixture(params=["nats", "kafka"])
def project(tmp_path: Path, request: pytest.FixtureRequest):
    """Issue 17: every README transcript, on `weft up`'s embedded NATS and on `weft up --broker kafka://...`
    (the session's Tansu, or WEFT_TEST_KAFKA_URL's Kafka)."""
    kafka = str(request.getfixturevalue("kafka_url")) if request.param == "kafka" else None
    p = Project(tmp_path / "yourdemo", kafka)
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


class Readme:
    """Runs README.md's commands (tests/readme_transcripts.py) in a project, with placeholders filled."""

    def __init__(self, project: Project) -> None:
        self.project, self.ran = project, set[str]()

    def __call__(self, command: str, code: int = 0, **fill: Any) -> subprocess.CompletedProcess[str]:
        assert command in readme_commands(), f"not a README command: {command}"
        text = command
        for name, value in fill.items():  # a list fills the placeholder's occurrences in order
            for one in value if isinstance(value, list) else [value] * text.count(f"<{name}>"):
                text = text.replace(f"<{name}>", one, 1)
        assert "<" not in text.replace("<TIME>", ""), text
        words = shlex.split(text)[1:]
        for n, word in enumerate(words):  # README's bare `bad.yaml` is shipped as examples/bad.yaml
            if word in files_used(text) and not (self.project.folder / word).exists():
                words[n] = f"examples/{Path(word).name}"
        self.ran.add(command)
        done = self.project.weft(*words, code=code)
        if "--json" not in words:  # what a person reads, whatever the terminal's width wrapped
            done.stdout, done.stderr = " ".join(done.stdout.split()), " ".join(done.stderr.split())
        return done


def _id(output: str) -> str:
    return re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", output).group(0)  # type: ignore[union-attr]


def test_the_readme_transcripts(project: Project) -> None:
    """Issue 16 part 2 item 2: every README transcript command, run against `weft up` in a project folder
    that holds only the shipped examples/ (step code is imported from there, the folder `weft up` runs in)."""
    readme = Readme(project)
    # The banner (README's `weft up`): the broker's line is the one that differs. On NATS, the server
    # `weft up` started, its data folder and credentials; on Kafka, the broker it was pointed at,
    # which it does not own (no data folder, its own access control).
    banner = " ".join(project.log.read_text().split())
    if project.kafka is None:
        assert "NATS JetStream nats://127.0.0.1:" in banner and "credentials required" in banner, banner
    else:
        assert f"Kafka {project.kafka}" in banner and "NATS" not in banner, banner
    for label in ("event store sqlite:///", "step modules examples", "HTTP gateway http://", "console http://"):
        assert label in banner, banner
    # A workflow: the order example, with its retried parcel.
    done = readme("weft run examples/order.yaml --input '{\"order_id\": \"A-1\", \"items\": [\"apple\", \"pear\", \"fig\"]}'")
    order = _id(done.stdout)
    assert "completed" in done.stdout and '"P1-2"' in done.stdout
    assert "completed" in readme("weft status <ID>", ID=order).stdout
    assert "ExecutionCompleted" in readme("weft history <ID>", ID=order).stdout
    assert "unknown step 'ghost'" in readme("weft run bad.yaml", code=2).stderr
    assert "'order_id' is a required property" in readme("weft run examples/order.yaml --input '{\"items\": 3}'",
                                                         code=2).stderr

    # Triggers: order-received subscribes to order.created (eu and uk only); the same event twice starts one.
    project.weft("workflows", "publish", "examples/order-received.yaml")
    first = readme("weft publish order.created --data '{\"order_id\": \"A-1002\", \"region\": \"uk\"}' --source shop "
                   "--id ord-1002")
    assert first.stdout.strip() == "ord-1002"
    again = readme("weft publish order.created --data '{\"order_id\": \"A-1002\", \"region\": \"uk\"}' --source shop "
                   "--id ord-1002")
    assert again.stdout.strip() == "ord-1002"
    # The note is NATS's: its stream dedups on the message id (source and id) within its window, so
    # publish() knows it dropped the repeat. Kafka has no publish-side dedup (services/broker/kafka.py),
    # a new `weft publish` process cannot know, and the repeat goes on the topic; the trigger consumer's
    # (source, id) record starts nothing for it, which the one execution below proves on both brokers.
    assert ("not published again" in again.stderr) == (project.kafka is None), again.stderr
    started = _until(lambda: [e for e in project.json("executions", "list", "--workflow", "order-received")
                              if e["status"] == "completed"])
    assert len(started) == 1
    types = readme("weft trigger-types").stdout
    assert "order.created" in types and "order-received@1" in types, types
    readme("weft publish invoice.paid --data '{}'")
    _until(lambda: "trigger_unroutable" in readme("weft dlq list").stdout)
    assert readme("weft keys create --scopes trigger,read --name ci").stdout.startswith("weft_")

    # Dead letters: the gateway is down, charge is dead-lettered; fix it; reprocess; completed.
    failed = readme("weft run examples/checkout.yaml --input '{\"order\": \"A-1001\", \"amount\": 42, \"country\": "
                    "\"FR\"}'", code=1)
    checkout = _id(failed.stdout)
    assert "payment gateway unreachable" in failed.stdout
    letters = _until(lambda: [d for d in project.json("dlq", "list") if d["execution_id"] == checkout])
    assert letters[0]["kind"] == "retries_exhausted" and letters[0]["step_id"] == "charge"
    prefix = letters[0]["id"][:8]
    shown = readme("weft dlq show <DLQ>", DLQ=prefix).stdout
    assert "ConnectionError" in shown and "payments.py" in shown, shown  # the error, and your code's frame
    (project.folder / "gateway-up").touch()
    assert "reprocessed" in readme('weft dlq reprocess <DLQ> --why "payment gateway is back"', DLQ=prefix).stdout
    _until(lambda: project.json("status", checkout)["status"] == "completed")
    assert "already_reprocessed" in readme("weft dlq reprocess <DLQ>", DLQ=prefix).stdout
    # Bad input? Patch it: ship refuses a country it does not ship to, for good.
    mars = project.json("run", "examples/checkout.yaml", "--input", '{"order": "A-1003", "amount": 5, "country": "MARS"}',
                        code=1)
    ship = _until(lambda: [d for d in project.json("dlq", "list") if d["execution_id"] == mars["execution_id"]])[0]
    assert ship["kind"] == "non_retryable" and ship["step_id"] == "ship"
    refused = readme("weft dlq reprocess <DLQ> --patch '[\"FR\"]'", code=2, DLQ=ship["id"][:8])
    assert "must be a JSON object" in refused.stderr
    readme("weft dlq reprocess <DLQ> --patch '{\"country\": \"FR\"}' --why \"customer moved to France\"",
           DLQ=ship["id"][:8])
    _until(lambda: project.json("status", mars["execution_id"])["status"] == "completed")

    # Replay: invoice, from a step, with a patched input; bulk; time travel.
    invoice = project.json("run", "examples/invoice.yaml", "--input",
                           '{"order_id": "A-1", "lines": [{"amount": 12}, {"amount": 30}]}')
    assert invoice["output"] == {"order": "A-1", "total": 42, "lines": 2}
    eid = invoice["execution_id"]
    plan = readme("weft replay <ID> --from-step total --dry-run", ID=eid).stdout
    assert "nothing was started" in plan and "reuse output" in plan
    replayed = readme("weft replay <ID> --from-step total --input-patch '{\"order_id\": \"A-1-fixed\"}' --wait", ID=eid)
    assert "A-1-fixed" in replayed.stdout and "completed" in replayed.stdout
    for _ in range(2):
        project.weft("run", "invoice", "--input", '{"order_id": "A-2", "lines": [{"amount": "x"}]}', code=1)
    bulk = "weft replay --filter 'workflow=invoice,status=failed' --input-patch '{\"lines\": [{\"amount\": 12}]}'"
    assert "started 2," in readme(bulk).stdout
    assert "started 0, skipped (already replayed by this operation) 2" in readme(bulk).stdout
    history = [json.loads(line) for line in project.weft("history", eid, "--json").stdout.splitlines()]
    at = readme("weft history <ID> --at <TIME>", ID=eid, TIME=history[4]["at"].replace("+00:00", "Z")).stdout
    assert "as of event 5" in at

    # Backfill: invoice@2 (examples/invoice-v2.yaml) over order.placed events published just now.
    project.weft("workflows", "publish", "examples/invoice-v2.yaml")
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 2))
    for n in range(3):
        project.weft("publish", "order.placed", "--data", json.dumps({"order_id": f"B-{n}", "lines": [{"amount": n}]}),
                     "--source", "shop", "--id", f"placed-{n}")
    # the trigger consumer records them (and starts invoice@2, the version subscribed now)
    _until(lambda: len(project.json("executions", "list", "--workflow", "invoice@2")) >= 3)
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    command = "weft backfill --workflow invoice@2 --from <TIME> --to <TIME> --rate 2/s"
    assert "started 3," in readme(command, TIME=[since, until]).stdout
    assert "skipped (already done) 3" in readme(command, TIME=[since, until]).stdout

    # Status views, and the large payload.
    assert "executions" in readme("weft projections status").stdout
    assert "rebuilt" in readme("weft projections rebuild dead_letters").stdout
    big = json.loads(readme("weft run big.yaml --input '{\"size\": 20971520}' --json").stdout)
    assert big["status"] == "completed" and big["output"]["bytes"] > 20971520

    assert set(readme_commands()) - set(SKIPPED) == readme.ran, set(readme_commands()) - set(SKIPPED) - readme.ran
