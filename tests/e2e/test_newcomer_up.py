"""Issue 16 part 2, items 3, 5 and 6, against a real `weft up` at 80 columns, as a newcomer meets them:
the webhook 503 names the variable to set, tables never cut an id, `workflows stats` and the banner
fit 80 columns, `history --at N` past the end says so, and shell completion works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_examples import Project

pytestmark = pytest.mark.e2e
WEFT = Path(sys.executable).parent / "weft"  # the console script: completion is keyed to its name


class NarrowProject(Project):
    """The examples in a project folder, `weft up` and every command at COLUMNS=80, and no webhook secret."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("ORDERS_SECRET", None)
        env["COLUMNS"] = "80"
        return env


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory):
    p = NarrowProject(tmp_path_factory.mktemp("newcomer") / "yourdemo")
    try:
        yield p
    finally:
        p.stop()


def test_the_banner_keeps_each_url_whole_on_a_short_line(narrow: NarrowProject) -> None:
    """Issue 16 part 2 item 5: at 80 columns no URL of the `weft up` banner is wrapped."""
    stack = json.loads((narrow.home / "stack.json").read_text())
    banner = narrow.log.read_text().splitlines()
    for url in (f"{stack['gateway_url']}/v1", f"{stack['gateway_url']}/v1/docs", stack["console_url"], stack["nats_url"]):
        [line] = [text for text in banner if text.rstrip().endswith(url)]
        assert len(line) <= 80, line
    assert all(len(line) <= 80 for line in banner if "http://" in line or "nats://" in line), banner


def test_tables_at_80_columns_never_cut_an_execution_id(narrow: NarrowProject) -> None:
    """Issue 16 part 2 item 5: `executions list` at COLUMNS=80 shows each full id on one line; columns that
    do not fit are dropped, and it says which; `workflows stats` fits 80 columns with its main figures."""
    ids = [narrow.json("run", "examples/invoice.yaml", "--input",
                       '{"order_id": "A-1", "lines": [{"amount": 12}, {"amount": 30}]}')["execution_id"]
           for _ in range(2)]
    listed = narrow.weft("executions", "list")
    for eid in ids:
        assert re.search(rf"\b{eid}\b", listed.stdout), listed.stdout
    assert all(len(line) <= 80 for line in listed.stdout.splitlines()), listed.stdout
    assert "not shown at this width" in listed.stderr
    stats = narrow.weft("workflows", "stats")
    lines = stats.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), stats.stdout
    header = " ".join(lines[:3])
    assert all(word in header for word in ("workflow", "total", "failed", "p50 ms", "p95 ms")), stats.stdout
    assert re.search(r"\binvoice\b.*\b2\b", stats.stdout)
    bulk = narrow.weft("replay", "--filter", "workflow=invoice", "--dry-run")  # two ids a row: 36 + 36 columns
    for eid in ids:
        assert re.search(rf"\b{eid}\b", bulk.stdout), bulk.stdout


def test_history_at_past_the_end_says_so(narrow: NarrowProject) -> None:
    """Issue 16 part 2 item 6: `weft history ID --at N` beyond the last event says so and exits 2."""
    eid = narrow.json("run", "examples/invoice.yaml", "--input", '{"order_id": "A-2", "lines": [{"amount": 1}]}')[
        "execution_id"]
    events = narrow.weft("history", eid, "--json").stdout.splitlines()
    last = narrow.json("history", eid, "--at", str(len(events)))
    assert last["as_of"] == len(events) == last["of"]
    past = narrow.weft("history", eid, "--at", str(len(events) + 1), code=2)
    assert f"has {len(events)} event(s)" in " ".join(past.stderr.split()) and past.stdout == ""
    before = narrow.weft("history", eid, "--at", "2000-01-01T00:00:00Z", code=2)
    assert "did not exist yet" in " ".join(before.stderr.split())


def test_a_webhook_whose_secret_is_unset_names_the_variable(narrow: NarrowProject) -> None:
    """Issue 16 part 2 item 3: the 503 says which variable to set, in `weft up`'s environment."""
    narrow.weft("workflows", "publish", "examples/order-received.yaml")
    url = json.loads((narrow.home / "stack.json").read_text())["gateway_url"]
    r = httpx.post(f"{url}/v1/webhooks/orders", json={"order_id": "A-1"},
                   headers={"X-Weft-Signature": "t=1,v1=00", "X-Weft-Delivery": "d-1"}, timeout=30)
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "ORDERS_SECRET" in message and "weft up" in message, message


def test_shell_completion(tmp_path: Path) -> None:
    """Issue 16 part 2 item 6: Typer's --show-completion prints a script, and completion answers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEFT_", "_WEFT"))}
    shown = subprocess.run([str(WEFT), "--show-completion", "bash"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "complete" in shown.stdout and "_WEFT_COMPLETE" in shown.stdout, shown.stderr
    answer = subprocess.run([str(WEFT)], env={**env, "_WEFT_COMPLETE": "complete_bash",
                                              "COMP_WORDS": "weft workflows s", "COMP_CWORD": "2"},
                            capture_output=True, text=True, timeout=60)
    assert set(answer.stdout.split()) == {"show", "stats"}, answer
    installed = subprocess.run([str(WEFT), "--install-completion", "bash"], env={**env, "HOME": str(tmp_path)},
                               capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    assert "weft" in (tmp_path / ".bashrc").read_text()


@pytest.mark.parametrize("args", [
    ("run", str(Path(__file__).resolve().parents[2] / "examples/order.yaml"), "--input", '{"order_id": "A-1"}'),
    ("executions", "list"), ("dlq", "list"), ("publish", "order.created", "--data", "{}"),
], ids=lambda a: " ".join(a[:2]))
def test_no_stack_as_a_newcomer_meets_it(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Issue 16 part 2 item 1, as the README's reader meets it: the console script in an empty folder,
    no WEFT_HOME: one line saying no stack runs in ./.weft and how to start one, exit 1, no ./.weft made."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    env["COLUMNS"] = "80"
    done = subprocess.run([str(WEFT), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == "", done
    [line] = done.stderr.splitlines()
    assert f"no Weft stack is running in {tmp_path.resolve() / '.weft'}" in line and "`weft up`" in line, line
    assert list(tmp_path.iterdir()) == []


def test_the_python_client_takes_name_at_version(narrow: NarrowProject) -> None:
    """Issue 16 part 2 item 4: NAME@VERSION in the Python client too (Client.workflow, Client.start)."""
    from weft.client import Client

    narrow.weft("workflows", "publish", "examples/invoice.yaml")
    narrow.weft("workflows", "publish", "examples/invoice-v2.yaml")
    with Client(json.loads((narrow.home / "stack.json").read_text())["gateway_url"]) as client:
        assert client.workflow("invoice@1").version == 1 and client.workflow("invoice").version == 2
        run = client.start("invoice@1", {"order_id": "C-1", "lines": [{"amount": 3}]})
        assert run.wait(timeout=30).version == 1
        with pytest.raises(ValueError, match="disagree"):
            client.start("invoice@1", {}, version=2)
    url = json.loads((narrow.home / "stack.json").read_text())["gateway_url"]
    assert httpx.get(f"{url}/v1/workflows/invoice@1", timeout=30).json()["version"] == 1  # over HTTP too
    assert httpx.get(f"{url}/v1/workflows/invoice@9", timeout=30).status_code == 404
    assert httpx.get(f"{url}/v1/workflows/invoice@x", timeout=30).status_code == 422
