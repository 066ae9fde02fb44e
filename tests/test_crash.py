"""kill -9 of `tessera serve` leaves nothing behind: its embedded redis-server and its
uvicorn workers die with it, and the next run takes over an orphaned embedded server
instead of joining it for good. Processes are killed, and looked for, by pid."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tessera.ops.embedded import redis_server_binary
from tests.conftest import PASSWORD, new_email
from tests.servers import ROOT, free_port, serve_command, session_server_env, tessera_server


def gone(pid: int, timeout: float = 15.0) -> bool:
    """The process has exited (a zombie awaiting its reaper counts as exited)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def kill_all(processes: list[psutil.Process]) -> None:
    for proc in processes:  # the test's own leftovers, by pid, should the fix fail
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def embedded_env(base_settings: dict[str, Any], data_dir: Path) -> dict[str, str]:
    return session_server_env(base_settings, data_dir, TESSERA_REDIS_URL="",
                              TESSERA_REDIS_DURABILITY="require")


def test_kill_9_of_tessera_takes_its_embedded_redis_along(base_settings, tmp_path) -> None:
    env = embedded_env(base_settings, tmp_path)
    with tessera_server(env, tmp_path / "logs") as server:
        children = descendants(server.proc.pid)
        redis = [p for p in children if "redis-server" in " ".join(p.cmdline())]
        assert len(redis) == 1
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        try:
            assert gone(redis[0].pid), "the embedded redis-server outlived tessera"
        finally:
            kill_all(children)
    # The next run starts (and owns) its own server on the same data folder.
    with tessera_server(env, tmp_path / "logs", name="again") as again:
        redis = [p for p in descendants(again.proc.pid) if "redis-server" in " ".join(p.cmdline())]
        assert len(redis) == 1


def test_the_next_run_takes_over_an_orphaned_embedded_redis(base_settings, tmp_path) -> None:
    # An embedded server whose tessera died without a trace (as before this fix): its
    # parent, a shell, exits at once.
    data = tmp_path
    sock = data / "redis.sock"
    shell = subprocess.run(
        ["sh", "-c", f'"{redis_server_binary()}" --port 0 --unixsocket "{sock}" --dir "{data}" '
                     f'--save "" --appendonly yes --daemonize no >/dev/null 2>&1 & echo $!'],
        capture_output=True, text=True, check=True)
    orphan = int(shell.stdout.strip())
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        env = embedded_env(base_settings, data)
        with tessera_server(env, tmp_path / "logs") as server:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                email = new_email()
                assert http.post("/auth/register", json={
                    "email": email, "password": PASSWORD, "is_adult": True}).status_code == 201
            owned = [p.pid for p in descendants(server.proc.pid)
                     if "redis-server" in " ".join(p.cmdline())]
        assert gone(orphan), "the orphaned embedded redis-server was joined and left running"
        assert owned and all(gone(pid) for pid in owned)  # stopped with the run that owns it
    finally:
        if not gone(orphan, timeout=0):
            kill_all([psutil.Process(orphan)])


def test_kill_9_of_the_workers_supervisor_frees_the_port(base_settings, tmp_path) -> None:
    port = free_port()
    env = embedded_env(base_settings, tmp_path)
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([*serve_command(port), "--workers", "2"], env=env, cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        while len([p for p in descendants(proc.pid) if "redis-server" not in p.name()]) < 2:
            time.sleep(0.1)  # both workers up
        children = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = [p.pid for p in children if not gone(p.pid)]
        assert not left, f"left running after the supervisor's kill -9: {left}"
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            raise AssertionError("something still answers on the port")
        except httpx.TransportError:
            pass
    finally:
        kill_all(children)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


