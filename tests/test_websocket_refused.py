"""Issue 12.5: nothing in tessera speaks WebSocket. A real `tessera serve` answers an upgrade
attempt as plain HTTP (never 101) and logs nothing of the client: no address, no path, no
query, at the default log level and with DNT: 1."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import LOOPBACK, TesseraServer, session_server_env, tessera_server


@pytest.fixture(scope="module")
def info_server(base_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[TesseraServer]:
    data_dir: Path = tmp_path_factory.mktemp("ws")
    env = session_server_env(base_settings, data_dir, TESSERA_LOG_LEVEL="info")
    with tessera_server(env, data_dir / "logs") as running:
        yield running


def upgrade_attempt(server: TesseraServer, path: str) -> tuple[bytes, int]:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall((
            f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nDNT: 1\r\nSec-GPC: 1\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer, client_port


@pytest.mark.parametrize("where", ["/ws-{t}?token={t}", "/auth/revocations?probe={t}",
                                   "/me?probe={t}"])
def test_an_upgrade_attempt_is_plain_http_and_leaves_nothing_of_the_client_in_the_log(
        info_server: TesseraServer, where: str) -> None:
    marker = secrets.token_hex(8)
    answer, client_port = upgrade_attempt(info_server, where.format(t=marker))
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 ") and b" 101 " not in status, answer[:200]
    assert int(status.split()[1]) >= 400  # refused: nothing is served at this path this way
    assert b"upgrade: websocket" not in answer.lower()
    time.sleep(0.3)  # let the server write whatever it logs
    log = info_server.log()
    assert marker not in log
    assert f":{client_port}" not in log and f", {client_port})" not in log
    assert "WebSocket" not in log  # nor uvicorn's hint to install a WebSocket library
