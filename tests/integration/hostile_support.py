"""A running stack for the hostile tests of the console's and CloudEvents' entrances: one per
backend (SQLite, PostgreSQL) and module, in a thread of its own (tests/support.Background),
with an admin key, a read key bound to `two-steps`, and one finished execution of each workflow."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from psycopg.sql import SQL, Identifier

from services.gateway.keys import Keys
from services.settings import Settings
from tests.support import Background

PARTS = ("orchestrator", "relay", "worker", "projector", "triggers", "gateway")
TWO = "name: two-steps\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, needs: [a]}\n"
OTHER = "name: other\non: [{event: other.happened}]\nsteps:\n  - {id: x, type: noop}\n"


class Gateway:
    def __init__(self, stack: Any, admin: str, bound: str):
        self.stack, self.admin, self.bound = stack, admin, bound
        self.url = stack.gateway.url
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.ctx = stack.gateway.app.state.ctx
        self.mine = self.other = ""
        self.loop: Any = None  # the stack's event loop (in its own thread)

    def client(self, key: str | None = None, **headers: str) -> httpx.Client:
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def start(self, workflow: str, data: Any = None) -> str:
        with self.client(self.admin) as c:
            r = c.post("/v1/executions", json={"workflow": workflow, "input": data or {}})
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

    def finished(self, eid: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client(self.admin) as c:
            while True:
                body = c.get(f"/v1/executions/{eid}").json()  # 404 until a trigger's execution is started
                if body.get("status") in ("completed", "failed", "cancelled"):
                    return dict(body)
                assert time.monotonic() < deadline, f"{eid} did not finish: {body}"
                time.sleep(0.05)

    def raw(self, request: bytes, *, read: int = 1 << 20, timeout: float = 10) -> bytes:
        """Send bytes as they are (what httpx would refuse to send) and read the answer."""
        out = b""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            try:
                s.sendall(request)
                while len(out) < read:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    out += chunk
            except (TimeoutError, ConnectionResetError, BrokenPipeError):
                pass  # the server may answer and close before it has read all we send
        return out

    def get_raw(self, target: bytes, *headers: bytes, key: str | None = None) -> bytes:
        lines = [b"GET " + target + b" HTTP/1.1", f"Host: {self.host}:{self.port}".encode(), *headers]
        if key:
            lines.append(f"Authorization: Bearer {key}".encode())
        lines.append(b"Connection: close")
        return self.raw(b"\r\n".join(lines) + b"\r\n\r\n")


def status_of(response: bytes) -> int:
    """The status code; 0 when the server closed the connection without one (a request too large to read)."""
    return int(response.split(b" ", 2)[1]) if response else 0


@contextmanager
def running_gateway(request: pytest.FixtureRequest, tmp: Path, nats_url: str, **overrides: Any) -> Iterator[Gateway]:
    schema = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'weft.db'}"
    else:
        schema = f"t_{uuid.uuid4().hex}"
        url = f"{request.getfixturevalue('pg_server_url')}?schema={schema}"
    settings = Settings(home=tmp, database_url=url, nats_url=nats_url, namespace=f"h{uuid.uuid4().hex[:8]}",
                        poll_interval=0.02, ack_wait=5.0, **overrides)
    try:
        background = Background(settings, PARTS)
        with background as stack:
            keys = Keys(stack.store)
            admin, _ = keys.create(["admin"], name="ops")
            bound, _ = keys.create(["read"], workflows=["two-steps"], name="bound")
            gw = Gateway(stack, admin, bound)
            gw.loop = background.loop
            with gw.client(admin) as c:
                for text in (TWO, OTHER):
                    r = c.post("/v1/workflows", content=text, headers={"content-type": "application/yaml"})
                    assert r.status_code == 201, r.text
            gw.mine, gw.other = gw.start("two-steps"), gw.start("other")
            gw.finished(gw.mine)
            gw.finished(gw.other)
            yield gw
    finally:
        if schema is not None:
            with psycopg.connect(request.getfixturevalue("pg_server_url"), autocommit=True) as conn:
                conn.execute(SQL("DROP SCHEMA IF EXISTS {0} CASCADE").format(Identifier(schema)))
