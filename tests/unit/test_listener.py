"""The HTTP servers' listening socket: connections accepted on it send small writes at once.

Nagle's algorithm on a served connection held every keep-alive response's second write
(uvicorn writes headers and body apart) until the client's delayed ACK: ~40 ms a request.
"""

from __future__ import annotations

import asyncio
import socket

from services.listener import listen


async def test_connections_accepted_on_the_listener_have_nagle_off() -> None:
    sock = listen("127.0.0.1", 0, "test")
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = writer.get_extra_info("socket")
        seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        try:
            assert await asyncio.wait_for(seen, 5) != 0
        finally:
            writer.close()


def test_a_port_in_use_is_a_clear_error() -> None:
    first = listen("127.0.0.1", 0, "first")
    try:
        port = first.getsockname()[1]
        try:
            listen("127.0.0.1", port, "second")
        except RuntimeError as exc:
            assert "second" in str(exc) and str(port) in str(exc)
        else:
            raise AssertionError("a second listener on a port in use was allowed")
    finally:
        first.close()
