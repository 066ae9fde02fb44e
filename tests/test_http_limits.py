"""The request head is bounded at the HTTP layer of a real `tessera serve`: a header stream
is cut off early with a 431, a connection that does not finish its headers is closed."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import TesseraServer, session_server_env, tessera_server

HEAD_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def limited(base_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[TesseraServer]:
    data_dir = tmp_path_factory.mktemp("http-limits")
    env = session_server_env(base_settings, data_dir,
                             TESSERA_HTTP_HEAD_TIMEOUT_SECONDS=str(HEAD_TIMEOUT),
                             TESSERA_HTTP_MAX_HEAD_BYTES="65536")
    with tessera_server(env, Path(data_dir) / "logs") as server:
        yield server


def _connect(server: TesseraServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=15)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (raises socket.timeout if it never does)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_100_mb_header_stream_is_cut_off_early(limited: TesseraServer) -> None:
    with _connect(limited) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
        chunk = b"a" * 65536
        sent = 0
        try:
            while sent < 100 * 2**20:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 8 * 2**20, "the server read a huge header block"
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"request_header_fields_too_large" in answer


def test_many_small_headers_are_cut_off_too(limited: TesseraServer) -> None:
    with _connect(limited) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"X-A: b\r\n" * 20000 + b"\r\n"
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"])
def test_a_connection_that_never_finishes_its_headers_is_closed(limited: TesseraServer,
                                                                sent: bytes) -> None:
    with _connect(limited) as sock:
        sock.sendall(sent)
        answer = _read_all(sock)  # socket.timeout (15 s) if the server keeps it open
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:200]


def test_a_slow_drip_is_closed_and_a_normal_client_is_served(limited: TesseraServer) -> None:
    import time

    with _connect(limited) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        for _ in range(40):  # one header byte every 0.25 s: never done within the timeout
            try:
                slow.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.25)
        if not closed:
            slow.settimeout(1)
            try:
                closed = _read_all(slow).startswith(b"HTTP/1.1 408 ")
            except TimeoutError:
                closed = False
        assert closed
    # Normal requests on one kept-alive connection, with headers of a normal size.
    with _connect(limited) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: "
                         + b"p" * 8000 + b"\r\n\r\n")
            answer = b""
            while b'"ok"' not in answer:
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ")
