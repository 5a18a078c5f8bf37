"""A listening TCP socket bound at once, for the HTTP servers (the gateway, the metrics port):
binding before serving means port 0 gives a free port known right away, and a port in use is
a clear error at start, not a log line from inside the server."""

from __future__ import annotations

import socket


def listen(host: str, port: int, what: str, backlog: int = 128) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on connections of a socket
    # whose proto says TCP. With proto 0 each keep-alive response (headers and body written apart)
    # waited for the client's delayed ACK: ~40 ms per request after the first on a connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"{what}: cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
