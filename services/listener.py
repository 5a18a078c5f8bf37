"""A listening TCP socket bound at once, for the HTTP servers (the gateway, the metrics port):
binding before serving means port 0 gives a free port known right away, and a port in use is
a clear error at start, not a log line from inside the server."""

from __future__ import annotations

import socket


def listen(host: str, port: int, what: str, backlog: int = 128) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"{what}: cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
