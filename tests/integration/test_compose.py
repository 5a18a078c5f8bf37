"""infra/docker-compose.yml, proven without a Docker engine (issue 15, part 4).

1. Debian's `docker-compose config` validates it, with every profile.
2. Every Weft service in it runs as a local process with the file's own command and
   environment: the host names map to this test's NATS (run with infra/nats.conf itself, so
   the broker's users and permissions are the deployment's) and a PostgreSQL schema of its
   own; `/run/secrets/X` maps to files in a temp dir; replicas are started as many times as
   `deploy.replicas` says; each service's healthcheck command is run against it. The one-shot
   services (broker-init, bootstrap) run to completion first, as `depends_on` orders them.
   Then a workflow runs through the gateway with the bootstrap admin key, one orchestrator and
   one worker are SIGKILLed (and restarted, as `restart: unless-stopped` does), and every
   execution completes exactly once.

A command, flag or WEFT_* variable that Weft does not understand fails this test.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from services.orchestrator.executions import Executions
from services.settings import Settings
from services.store import open_store
from tests.pg_cluster import pg_cluster  # noqa: F401 - the fixture
from tests.support import assert_applied_once, wait_until

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra" / "docker-compose.yml"
pytestmark = pytest.mark.integration
ROLES = ("ADMIN", "WORKER", "ORCHESTRATOR", "GATEWAY", "PUBLISHER", "DEADLETTERS")
ONE_SHOT = ("broker-init", "bootstrap")
# Variables a Weft process reads that are not fields of Settings.
KNOWN_EXTRA = {"WEFT_LOG_LEVEL", "WEFT_LOG_FORMAT", "WEFT_CRASH_AT"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _interpolate(value: Any, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default}."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        got = env.get(name, "")
        if op == ":?" and not got:
            raise AssertionError(f"compose needs {name}: {arg}")
        return got or (arg if op == ":-" else "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:\?|:-)([^}]*))?\}", one, str(value))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _passwords() -> dict[str, str]:
    return {f"WEFT_NATS_{r}_PASSWORD": secrets.token_hex(16) for r in ROLES}


def test_docker_compose_config_validates_it() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("docker-compose (Debian's package) is required in CI to validate infra/docker-compose.yml")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {**os.environ, **_passwords()}
    for profiles in ([], ["--profile", "observability", "--profile", "cluster", "--profile", "kafka"]):
        done = subprocess.run([tool, "-f", str(COMPOSE), *profiles, "config", "-q"], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def test_every_weft_variable_in_it_is_one_weft_knows(compose: dict[str, Any]) -> None:
    known = {f"WEFT_{name.upper()}" for name in Settings.model_fields} | KNOWN_EXTRA
    for name, service in compose["services"].items():
        if "build" not in service:
            continue  # not a Weft process (the nats servers read their users' passwords as WEFT_NATS_*)
        for var in (service.get("environment") or {}):
            if var.startswith("WEFT_"):
                assert var in known, f"{name}: {var} is not a Weft setting"


class Deployment:
    """The compose file's Weft services as local processes."""

    def __init__(self, compose: dict[str, Any], tmp: Path, pg_url: str) -> None:
        self.compose, self.tmp = compose, tmp
        self.env = {**_passwords(), "OTEL_TRACES_EXPORTER": "none"}
        self.secrets = tmp / "secrets"
        self.secrets.mkdir()
        self.admin_key = f"weft_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
        (self.secrets / "admin_key").write_text(self.admin_key + "\n")
        (self.secrets / "orders_secret").write_text("whsec-compose\n")
        self.pg_url = pg_url
        self.nats = self._start_nats()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.gateway_port = 0
        self.logs = tmp / "logs"
        self.logs.mkdir()

    # -- NATS from infra/nats.conf, on free ports and a temp store ------------------------------
    def _start_nats(self) -> subprocess.Popen[bytes]:
        from services.broker.nats_server import find_nats_server_binary

        self.nats_port, monitor = _free_port(), _free_port()
        conf = (ROOT / "infra" / "nats.conf").read_text()
        conf = re.sub(r"(?m)^port: \d+$", f"port: {self.nats_port}", conf)
        conf = re.sub(r"(?m)^http: \d+$", f"http: {monitor}", conf)
        conf = conf.replace("store_dir: /data", f"store_dir: {self.tmp / 'nats'}")
        path = self.tmp / "nats.conf"
        path.write_text(conf)
        log = open(self.tmp / "nats.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen([str(find_nats_server_binary()), "-c", str(path)], env={**os.environ, **self.env},
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.nats_port), timeout=0.5):
                    return proc
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (self.tmp / "nats.log").read_text()
                time.sleep(0.05)

    # -- one service ----------------------------------------------------------------------------
    def _environment(self, name: str, service: dict[str, Any], key: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEFT_", "OTEL_"))}
        for var, value in (service.get("environment") or {}).items():
            text = _interpolate(value, self.env)
            if var == "WEFT_DATABASE_URL":
                assert urlsplit(text).hostname == "postgres", text
                text = self.pg_url
            elif var == "WEFT_NATS_URL":
                assert urlsplit(text).hostname == "nats", text
                text = f"nats://127.0.0.1:{self.nats_port}"
            elif var == "WEFT_METRICS_PORT":
                self.ports[key] = _free_port()
                text = str(self.ports[key])
            elif var == "WEFT_METRICS_HOST":
                text = "127.0.0.1"
            elif text.startswith("/run/secrets/"):
                text = str(self.secrets / text.removeprefix("/run/secrets/"))
            env[var] = text
        env["WEFT_HOME"] = str(self.tmp / "home")
        env["PYTHONPATH"] = str(ROOT)
        return env

    def _command(self, service: dict[str, Any]) -> list[str]:
        command = [str(c).replace("/run/secrets/", f"{self.secrets}/") for c in service["command"]]
        if "--port" in command:  # the gateway: a free port here, in place of the container's 8080
            self.gateway_port = self.gateway_port or _free_port()
            command[command.index("--port") + 1] = str(self.gateway_port)
            command[command.index("--host") + 1] = "127.0.0.1"
        return [sys.executable, "-m", "weft", *command]

    def start(self, name: str, replica: int = 1) -> subprocess.Popen[bytes]:
        service = self.compose["services"][name]
        key = f"{name}-{replica}"
        env = self._environment(name, service, key)
        # Volumes: the worker's step code is ../examples mounted at /app/examples, working_dir /app.
        cwd = ROOT if service.get("working_dir") == "/app" else self.tmp
        with open(self.logs / f"{key}-{time.monotonic_ns()}.log", "wb") as log:
            proc = subprocess.Popen(self._command(service), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        self.procs[key] = proc
        return proc

    def healthy(self, name: str, key: str) -> bool:
        """Run the service's own healthcheck command, with the ports it has here."""
        check = self.compose["services"][name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        test = [str(t) for t in check["test"]]
        assert test[0] == "CMD", test
        argv = [a.replace(":9464/", f":{self.ports.get(key, 0)}/").replace(":8080/", f":{self.gateway_port}/")
                for a in test[1:]]
        if argv[0] == "python":
            argv[0] = sys.executable
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0

    def weft_services(self) -> list[str]:
        return [n for n, s in self.compose["services"].items()
                if "build" in s and not s.get("profiles") and n not in ONE_SHOT]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.nats.kill()
        self.nats.wait()

    def dump_logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.iterdir()))


WORKFLOW = """
name: composed
steps:
  - {id: a, type: noop}
  - {id: b, type: transform, needs: [a], with: {expression: "n"}, input: {n: "${{ input.n }}"}}
  - {id: c, type: sleep, needs: [b], with: {seconds: 0.2}}
output: "${{ steps.b.output }}"
"""


async def test_the_compose_services_run_a_workflow_through_kills(
    compose: dict[str, Any], tmp_path: Path, pg_cluster: Any  # noqa: F811
) -> None:
    # A PostgreSQL of its own: ten service processes hold a pool of connections each, more than
    # a default server's 100 leaves beside the rest of the suite.
    pg_url = pg_cluster.url
    deployment = Deployment(compose, tmp_path, pg_url)
    try:
        for name in ONE_SHOT:  # depends_on: service_completed_successfully
            proc = deployment.start(name)
            assert await asyncio.to_thread(proc.wait, 60) == 0, deployment.dump_logs()
        for name in deployment.weft_services():
            replicas = int((compose["services"][name].get("deploy") or {}).get("replicas", 1))
            for i in range(1, replicas + 1):
                deployment.start(name, i)
        keys = [k for k in deployment.procs if k.split("-")[0] not in ("broker", "bootstrap")]
        for key in keys:
            name = key.rsplit("-", 1)[0]
            await wait_until(lambda n=name, k=key: deployment.healthy(n, k), timeout=60, interval=0.5,
                             what=f"{key}'s healthcheck")
        assert {k.rsplit("-", 1)[0] for k in keys} >= {"orchestrator", "relay", "projector", "triggers", "scheduler",
                                                        "gateway", "deadletters", "worker"}
        assert len([k for k in keys if k.startswith("orchestrator")]) == 2
        assert len([k for k in keys if k.startswith("worker")]) == 2

        headers = {"Authorization": f"Bearer {deployment.admin_key}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{deployment.gateway_port}", headers=headers,
                                     timeout=30) as client:
            r = await client.post("/v1/workflows", content=WORKFLOW, headers={"Content-Type": "application/yaml"})
            assert r.status_code in (200, 201), r.text
            ids = []
            for i in range(30):
                r = await client.post("/v1/executions", json={"workflow": "composed", "input": {"n": i}},
                                      headers={"Idempotency-Key": f"c-{i}"})
                assert r.status_code in (200, 201), r.text
                ids.append(r.json()["id"])
                if i == 10:  # mid-flight: one orchestrator and one worker die, and are restarted
                    for key in ("orchestrator-1", "worker-1"):
                        deployment.procs[key].kill()
                        deployment.procs[key].wait()
                        deployment.start(key.rsplit("-", 1)[0], 1)

        store = open_store(pg_url)
        try:
            executions = Executions(store)

            async def done() -> bool:
                states = await asyncio.to_thread(lambda: [executions.load(i, fresh=True) for i in ids])
                return all(s.status == "completed" for s in states)

            await wait_until(done, timeout=90, interval=0.5, what="every execution to complete")
            for i, eid in enumerate(ids):
                history = executions.history(eid)
                assert_applied_once(history)
                assert history[-1].output == i
        finally:
            store.close()
        alive = {k: p.poll() for k, p in deployment.procs.items() if k not in ("broker-init-1", "bootstrap-1")}
        assert all(code is None for code in alive.values()), (alive, deployment.dump_logs())
    finally:
        deployment.stop()
