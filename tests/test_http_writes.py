"""A response leaves in one write: tessera's HTTP protocol (ops/http.py) holds the head
uvicorn writes on `http.response.start` until the body's first bytes. Served by a real
uvicorn on uvloop, on a loopback socket, with the connection's real transport counted."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from tessera.ops.http import BoundedHttpToolsProtocol

BODY = b'{"ok":true}'
WRITES: list[int] = []  # per connection made: how many writes its transport took


class _Counted:
    """The real transport, counting the calls that put bytes on the socket."""

    def __init__(self, transport: asyncio.Transport, slot: int) -> None:
        self._transport = transport
        self._slot = slot

    def write(self, data: bytes) -> None:
        WRITES[self._slot] += 1
        self._transport.write(data)

    def writelines(self, data: Any) -> None:
        WRITES[self._slot] += 1
        self._transport.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CountingProtocol(BoundedHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        WRITES.append(0)
        super().connection_made(_Counted(transport, len(WRITES) - 1))  # type: ignore[arg-type]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(BODY)).encode())]
    if scope["path"] == "/slow-body":  # a streamed answer: the body comes much later
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await asyncio.sleep(0.8)
        await send({"type": "http.response.body", "body": b"late"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, loop="uvloop", lifespan="off",
                            http=CountingProtocol, ws="none", log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not (srv.started and srv.servers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "uvicorn did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield "127.0.0.1", port
    srv.should_exit = True
    thread.join(10)


def _request(path: str, extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n"


def _read_response(sock: socket.socket, buffered: bytearray) -> bytes:
    """One content-length response off the socket (bytes past it stay in `buffered`)."""
    while b"\r\n\r\n" not in buffered:
        chunk = sock.recv(65536)
        assert chunk, "the server closed before a whole head"
        buffered += chunk
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed before the whole body"
        rest += chunk
    buffered[:] = rest[length:]
    return head + b"\r\n\r\n" + rest[:length]


def test_a_response_is_one_write(server: tuple[str, int]) -> None:
    with socket.create_connection(server, timeout=10) as sock:
        buffered = bytearray()
        for _ in range(3):  # kept alive: each response one write
            sock.sendall(_request("/"))
            answer = _read_response(sock, buffered)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert answer.endswith(b"\r\n\r\n" + BODY)
        slot = len(WRITES) - 1
    assert WRITES[slot] == 3, f"{WRITES[slot]} writes for 3 responses"


def test_pipelined_requests_are_answered_in_order(server: tuple[str, int]) -> None:
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(_request("/a") + _request("/b") + _request("/c"))
        buffered = bytearray()
        answers = [_read_response(sock, buffered) for _ in range(3)]
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") and a.endswith(BODY) for a in answers)
    assert not buffered


def test_a_closing_response_arrives_whole(server: tuple[str, int]) -> None:
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(_request("/", b"Connection: close\r\n"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close\r\n" in data.lower()
    assert data.endswith(b"\r\n\r\n" + BODY)


def test_a_late_body_does_not_hold_back_the_head(server: tuple[str, int]) -> None:
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(_request("/slow-body"))
        first = sock.recv(65536)  # returns once the head is here: held, it would bring "late"
        assert first.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"late" not in first, "the head waited for the body"
        rest = b""
        while b"0\r\n\r\n" not in rest:
            chunk = sock.recv(65536)
            assert chunk
            rest += chunk
    assert b"late" in rest
