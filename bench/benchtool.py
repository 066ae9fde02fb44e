"""Helpers for bench/run.sh: seeding, wrk runs, token minting, floors, memory, report.

Run with the Python that has tessera installed (run.sh passes $PY):
    python bench/benchtool.py SUBCOMMAND --help
The HTTP side uses the standard library only (http.client, one keep-alive connection).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------- HTTP --


class Client:
    """One keep-alive HTTP/1.1 connection to base_url (http only, loopback)."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme != "http":
            raise SystemExit(f"only http:// URLs are supported, got {base_url}")
        self.host, self.port = u.hostname, u.port or 80
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return resp.status, data
            except (ConnectionError, http.client.HTTPException, OSError):
                if self.conn:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, payload: dict, headers: dict | None = None):
        h = {"Content-Type": "application/json", **(headers or {})}
        status, data = self.request(method, path, json.dumps(payload).encode(), h)
        return status, _loads(data)


def _loads(data: bytes):
    try:
        return json.loads(data) if data else None
    except ValueError:
        return data[:200].decode(errors="replace")


def cmd_wait_http(a):
    deadline = time.monotonic() + a.timeout
    u = urllib.parse.urlsplit(a.url)
    while time.monotonic() < deadline:
        try:
            status, _ = Client(f"{u.scheme}://{u.netloc}", timeout=2).request("GET", u.path or "/")
            if status < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{a.url} did not answer within {a.timeout}s")


def cmd_free_ports(a):
    """Print N distinct free TCP ports on 127.0.0.1 (kernel-chosen)."""
    import socket
    socks, ports = [], []
    for _ in range(a.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


def cmd_policy(a):
    status, body = Client(a.base).request("GET", "/policy")
    if status != 200:
        raise SystemExit(f"GET /policy answered {status}")
    print(json.loads(body)["version"])


def cmd_seed(a):
    """Register the bench user (an existing one is fine), log in, check /me and
    introspection with the fresh token, print the token."""
    c = Client(a.base)
    status, policy = c.request("GET", "/policy")
    version = json.loads(policy)["version"] if status == 200 else None
    status, body = c.json("POST", "/auth/register", {
        "email": a.email, "password": a.password, "is_adult": True, "policy_version": version})
    if not (status == 201 or (status == 409 and isinstance(body, dict)
                              and body.get("code") == "email_taken")):
        raise SystemExit(f"register answered {status}: {body}")
    status, body = c.json("POST", "/auth/login", {"email": a.email, "password": a.password})
    if status != 200 or not isinstance(body, dict) or "access_token" not in body:
        raise SystemExit(f"login answered {status}: {body}")
    token = body["access_token"]
    status, _ = c.request("GET", "/me", headers={"Authorization": f"Bearer {token}"})
    if status != 200:
        raise SystemExit(f"GET /me with a fresh token answered {status}")
    if a.service_key:
        status, data = c.request(
            "POST", "/auth/introspect", urllib.parse.urlencode({"token": token}).encode(),
            {"Authorization": f"Bearer {a.service_key}",
             "Content-Type": "application/x-www-form-urlencoded"})
        body = _loads(data)
        if status != 200 or not (isinstance(body, dict) and body.get("active") is True):
            raise SystemExit(f"introspect of a fresh token answered {status}: {body}")
    print(token)


# ------------------------------------------------------------- CPU accounting --


def _pid_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _cpu_ticks() -> dict[str, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = list(map(int, vals[:8]))
            idle = v[3] + v[4]
            out[name] = (sum(v) - idle, sum(v))
    return out


def snapshot(pids: list[int], include_self: bool = False) -> dict:
    """include_self: this process is the load generator (login-mfa), not wrk."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk (and taskset), once reaped
    load = ru.ru_utime + ru.ru_stime
    if include_self:
        me = resource.getrusage(resource.RUSAGE_SELF)
        load += me.ru_utime + me.ru_stime
    return {"t": time.monotonic(), "cpus": _cpu_ticks(),
            "pids": {str(p): _pid_ticks(p) for p in pids}, "children": load}


def cpu_use(before: dict, after: dict, server_cpu: int, load_cpu: int) -> dict:
    """Busy shares over the interval: each CPU's, ours (pids, all on the server CPU),
    and 'foreign' = server CPU busy not accounted for by our pinned processes."""
    hz = os.sysconf("SC_CLK_TCK")
    wall = max(1e-6, after["t"] - before["t"])
    res = {}
    for label, cpu in (("server", server_cpu), ("load", load_cpu)):
        name = f"cpu{cpu}"
        if name in before["cpus"] and name in after["cpus"]:
            b0, t0 = before["cpus"][name]
            b1, t1 = after["cpus"][name]
            res[f"{label}_cpu_busy"] = (b1 - b0) / max(1, t1 - t0)
    ours = sum(after["pids"].get(p, 0) - v for p, v in before["pids"].items()) / hz / wall
    res["ours_on_server_cpu"] = ours
    if "server_cpu_busy" in res:
        res["foreign_on_server_cpu"] = max(0.0, res["server_cpu_busy"] - ours)
    wrk = (after.get("children", 0) - before.get("children", 0)) / wall
    res["wrk_on_load_cpu"] = wrk
    if "load_cpu_busy" in res:  # a starved load generator under-reports the server
        res["foreign_on_load_cpu"] = max(0.0, res["load_cpu_busy"] - wrk)
    return res


def _speed_probe(cpu: int) -> float:
    """Milliseconds for a fixed pure-Python loop on `cpu` (best of 5): a slower machine
    (another VM or process on the host, an SMT sibling, throttling) shows here even when
    /proc/stat shows nothing else running in this one."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        pass
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x = 0
        for i in range(200_000):
            x += i * i % 7
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def cmd_background(a):
    """Busy share of each CPU over a quiet second (our servers idle): other work on the box;
    and the speed probe on the server CPU."""
    b = _cpu_ticks()
    time.sleep(a.secs)
    c = _cpu_ticks()
    busy = {k: (c[k][0] - b[k][0]) / max(1, c[k][1] - b[k][1]) for k in c}
    load = Path("/proc/loadavg").read_text().split()[:3]
    probe = _speed_probe(a.cpu)
    rec = {"kind": "background", "label": a.label, "loadavg": list(map(float, load)),
           "probe_ms": round(probe, 2),
           **{f"{k}_busy": round(v, 3) for k, v in sorted(busy.items())}}
    if a.results:
        _append(a.results, rec)
    print("  background (" + a.label + "): load " + " ".join(load) + "; "
          + ", ".join(f"{k} {v:.0%} busy" for k, v in sorted(busy.items()))
          + f"; speed probe {probe:.1f} ms", file=sys.stderr)


def cmd_idle(a):
    """Wait until the server is idle: an abandoned backlog (wrk stops, the server keeps
    hashing or flushing) must not leak into the next run."""
    if not a.pid or not Path(f"/proc/{a.pid}").exists():
        time.sleep(a.sleep)
        return
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + a.timeout
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        t0 = _pid_ticks(a.pid)
        time.sleep(0.25)
        busy = (_pid_ticks(a.pid) - t0) / hz / 0.25
        quiet = quiet + 1 if busy < 0.05 else 0


# ------------------------------------------------------------------------ wrk --


def _seconds(d: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", d.strip())
    if not m:
        raise SystemExit(f"bad duration {d!r}")
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def run_wrk(pin: str, conns: int, duration: str, script: str, url: str,
            args: list[str], timeout: str = "30s") -> dict:
    cmd = [*shlex.split(pin), "wrk", "-t1", f"-c{conns}", f"-d{duration}",
           "--timeout", timeout, "-s", str(HERE / "lua" / script), url]
    if args:
        cmd += ["--", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if line is None:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit("wrk printed no WRK_RESULT line (see its output above)")
    return json.loads(line.split(" ", 1)[1])


def _record(a, r: dict, conns: int, before: dict | None, after: dict | None,
            **extra) -> dict:
    rec = {"kind": "wrk", "scenario": a.scenario, "request": a.request, "run": a.run,
           "conns": conns, **r,
           # Little's law: a closed loop of `conns` clients with no think time completes
           # conns / mean latency requests per second, unquantised by the run's end
           "rps_little": conns * 1e6 / r["mean_us"] if r.get("mean_us") else 0.0,
           "errors": r["connect"] + r["read"] + r["write"] + r["timeout"], **extra}
    if before and after:
        rec.update({k: round(v, 3) for k, v in
                    cpu_use(before, after, a.server_cpu, a.load_cpu).items()})
    _append(a.results, rec)
    return rec


def _pids(a) -> list[int]:
    return [int(p) for p in (a.pids or "").split(",") if p]


def cmd_wrk(a):
    """One wrk run (pinned), recorded with the CPU use of our server processes."""
    url, args = a.wrk_args[0], a.wrk_args[1:]
    if args and args[0] == "--":
        args = args[1:]
    if a.warmup:
        r = run_wrk(a.pin, a.conns, a.duration, a.script, url, args)
        print(f"{r['rps']:.1f}")
        return
    before = snapshot(_pids(a))
    r = run_wrk(a.pin, a.conns, a.duration, a.script, url, args)
    after = snapshot(_pids(a))
    rec = _record(a, r, a.conns, before, after)
    if rec.get("exhausted"):
        print(f"  WARNING: {a.scenario} ran out of tokens ({rec['exhausted']} requests without "
              f"one): raise the pool", file=sys.stderr)
    if rec.get("stale"):
        print(f"  WARNING: {a.scenario}: {rec['stale']} requests past the last TOTP code "
              f"written (TOTP_HORIZON_STEPS)", file=sys.stderr)


def _pct(sorted_us: list[float], q: float) -> float:
    if not sorted_us:
        return float("nan")
    return sorted_us[min(len(sorted_us) - 1, int(q / 100 * len(sorted_us)))]


def run_login_mfa(base: str, users: list[tuple[str, str]] | None, password: str, conns: int,
                  secs: float, plain_email: str = "", plain: bool = False) -> dict:
    """CONNS clients (threads, one keep-alive connection each), each logging in back to back
    in two steps for as long as SECS: POST /auth/login with the password (401 mfa_required,
    its mfa_token), then POST /auth/login/mfa with the code pyotp computes for the user's
    secret right then. Each login takes the next unused user (a time step's code is accepted
    once per user). The result has wrk's fields (report.lua) for a whole two-step login,
    and the latencies of each step. With users None: plain one-step logins of PLAIN_EMAIL
    (no second factor) by the same clients, the like-for-like baseline. With PLAIN: plain
    one-step logins, each of the next unused user of USERS (the login-flood scenario's other
    users: each logs in once, far below any per-account limit)."""
    import threading

    import pyotp

    lock = threading.Lock()
    it = iter(users) if users is not None else None
    full, first, second = [], [], []
    counts = {"non2xx": 0, "read": 0, "exhausted": 0}
    stop = time.monotonic() + secs

    def take():
        if it is None:
            return (plain_email, "")
        with lock:
            return next(it, None)

    def client():
        c = Client(base)
        while time.monotonic() < stop:
            user = take()
            if user is None:
                with lock:
                    counts["exhausted"] += 1
                return
            email, secret = user
            try:
                t0 = time.perf_counter()
                s1, b1 = c.json("POST", "/auth/login", {"email": email, "password": password})
                t1 = time.perf_counter()
                if it is None or plain:  # plain login
                    with lock:
                        counts["non2xx"] += s1 != 200
                        full.append((t1 - t0) * 1e6)
                    continue
                token = b1.get("mfa_token") if isinstance(b1, dict) else None
                if s1 != 401 or not token:
                    with lock:
                        counts["non2xx"] += 1
                    continue
                s2, _ = c.json("POST", "/auth/login/mfa",
                               {"mfa_token": token, "code": pyotp.TOTP(secret).now()})
                t2 = time.perf_counter()
            except OSError:
                with lock:
                    counts["read"] += 1
                c = Client(base)
                continue
            with lock:
                if s2 != 200:
                    counts["non2xx"] += 1
                full.append((t2 - t0) * 1e6)
                first.append((t1 - t0) * 1e6)
                second.append((t2 - t1) * 1e6)

    t_start = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(conns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t_start
    full.sort(); first.sort(); second.sort()
    return {"requests": len(full), "duration_s": round(wall, 3),
            "rps": len(full) / wall if wall else 0.0,
            "p50_us": _pct(full, 50), "p90_us": _pct(full, 90), "p99_us": _pct(full, 99),
            "max_us": full[-1] if full else float("nan"),
            "mean_us": statistics.mean(full) if full else 0.0,
            "non2xx": counts["non2xx"], "connect": 0, "read": counts["read"], "write": 0,
            "timeout": 0, "exhausted": counts["exhausted"],
            **({"step1_p50_us": _pct(first, 50), "step2_p50_us": _pct(second, 50),
                "step2_p99_us": _pct(second, 99),
                "step2_mean_us": statistics.mean(second) if second else 0.0} if second else {}),
            "driver": "benchtool.py login-mfa (Python threads, pyotp)"}


def cmd_login_mfa(a):
    """The two-step login with TOTP (run_login_mfa), recorded like a wrk run; the users come
    from `mint-totp` (EMAIL SECRET lines) and each is used once. With --plain-email instead
    of --users: plain logins of that user by the same driver."""
    users = None if a.plain_email else [
        (x.split()[0], (x.split() + [""])[1])
        for x in Path(a.users).read_text().splitlines() if x.strip()]
    secs = _seconds(a.duration)
    if a.warmup:
        r = run_login_mfa(a.base, users, a.password, a.conns, secs, a.plain_email,
                          a.plain_users)
        print(f"{r['rps']:.1f}")
        return
    before = snapshot(_pids(a), include_self=True)
    r = run_login_mfa(a.base, users, a.password, a.conns, secs, a.plain_email, a.plain_users)
    after = snapshot(_pids(a), include_self=True)
    rec = _record(a, r, a.conns, before, after)
    if rec.get("exhausted"):
        print(f"  WARNING: {a.scenario} ran out of TOTP users: raise the pool", file=sys.stderr)


def cmd_mfa_step_cost(a):
    """POST /auth/login/mfa one at a time, one keep-alive client, nothing else running: the
    server's CPU time per step (utime + stime of the tessera worker, and of Redis, from
    /proc/<pid>/stat over --steps steps), the wall time per step, and, in a separate untimed
    pass of --monitor-steps steps under Redis MONITOR, the commands (round trips; a
    pipeline's commands count one each) the worker sends Redis per step, and how many of
    them are scripts. Tokens from `mint-totp --tokens` (each used once)."""
    import threading

    import redis as sync_redis

    lines = [x for x in Path(a.tokens).read_text().splitlines() if x.strip()]
    need = a.steps + a.monitor_steps + a.warm_steps
    if len(lines) < need:
        raise SystemExit(f"mfa-step-cost: {need} tokens needed, {len(lines)} given")
    c = Client(a.base)
    failures = 0

    def step(line: str) -> float:
        nonlocal failures
        token, first, *codes = line.split()
        i = int(time.time() // 30) - int(first)
        code = codes[i] if 0 <= i < len(codes) else "000000"
        t0 = time.perf_counter()
        status, _ = c.json("POST", "/auth/login/mfa", {"mfa_token": token, "code": code})
        wall = time.perf_counter() - t0
        failures += status != 200
        return wall

    pool = iter(lines)
    for _ in range(a.warm_steps):
        step(next(pool))
    hz = os.sysconf("SC_CLK_TCK")
    # The steps in blocks, alternated (ABBA) with blocks of GET /healthz on the same
    # connection, one at a time too: the server's CPU for an empty request says how fast
    # the host is meanwhile (its speed swings within a run; docs/performance.md).
    blocks = 4
    per_block = max(1, a.steps // blocks)
    walls: list[float] = []
    step_ticks = redis_ticks = ref_ticks = ref_n = 0
    for b in range(blocks):
        for kind in (("steps", "ref") if b % 2 == 0 else ("ref", "steps")):
            t0, r0 = _pid_ticks(a.pid), _pid_ticks(a.redis_pid)
            if kind == "steps":
                walls += [step(next(pool)) for _ in range(per_block)]
                step_ticks += _pid_ticks(a.pid) - t0
                redis_ticks += _pid_ticks(a.redis_pid) - r0
            else:
                for _ in range(per_block * 3):
                    c.request("GET", "/healthz")
                ref_ticks += _pid_ticks(a.pid) - t0
                ref_n += per_block * 3
    steps = per_block * blocks
    cpu_us = step_ticks / hz / steps * 1e6
    redis_cpu_us = redis_ticks / hz / steps * 1e6
    ref_us = ref_ticks / hz / ref_n * 1e6

    seen: list[dict] = []
    marker = "bench:mfa-cost-marker:" + os.urandom(6).hex()
    ready = threading.Event()

    def watch() -> None:
        r = sync_redis.Redis(port=a.redis_port, decode_responses=True)
        with r.monitor() as m:
            ready.set()
            while True:
                cmd = m.next_command()
                if marker in cmd["command"]:
                    return
                seen.append(cmd)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    ready.wait(10)
    time.sleep(0.2)
    for _ in range(a.monitor_steps):
        step(next(pool))
    sync_redis.Redis(port=a.redis_port).get(marker)
    th.join(10)
    sent = [x for x in seen if x.get("client_type") != "lua"]
    scripts = [x for x in sent if x["command"].split()[0].upper() in ("EVALSHA", "EVAL")]
    walls.sort()
    rec = {"kind": "mfa-cost", "steps": steps, "failures": failures,
           "cpu_us": cpu_us, "redis_cpu_us": redis_cpu_us, "healthz_cpu_us": ref_us,
           "wall_p50_us": _pct([w * 1e6 for w in walls], 50),
           "wall_mean_us": statistics.mean(walls) * 1e6,
           "redis_commands": len(sent) / a.monitor_steps,
           "redis_scripts": len(scripts) / a.monitor_steps,
           "redis_command_names": sorted({x["command"].split()[0].upper() for x in sent})}
    _append(a.results, rec)
    print(f"  mfa-step-cost: {steps} steps one at a time: server CPU {_fmt_us(cpu_us)}/step "
          f"(+ Redis {_fmt_us(redis_cpu_us)}; GET /healthz alternated with them: "
          f"{_fmt_us(ref_us)}), wall p50 {_fmt_us(rec['wall_p50_us'])}; "
          f"{rec['redis_commands']:.1f} Redis commands/step ({rec['redis_scripts']:.1f} "
          f"scripts: {', '.join(rec['redis_command_names'])}); {failures} not 200",
          file=sys.stderr)


def cmd_paced(a):
    """GET at about TARGET req/s: C connections, each waiting a random 0..2*D ms before each
    request (lua/paced_get.lua). C is first estimated from the peak (service time 1/peak),
    then corrected from short calibration runs until the achieved rate is within 8%."""
    url, args = a.wrk_args[0], a.wrk_args[1:]
    if args and args[0] == "--":
        args = args[1:]
    token, headers = args[0], args[1:]
    target = a.peak * a.fraction
    service_ms = 1000.0 / a.peak
    conns = max(1, round(target * (a.mean_delay_ms + service_ms) / 1000))
    calib = f"{max(1, min(math.ceil(_seconds(a.duration)), 5))}s"
    for attempt in range(4):
        r = run_wrk(a.pin, conns, calib, "paced_get.lua", url,
                    [token, str(a.mean_delay_ms), *headers])
        ratio = r["rps"] / target
        print(f"  paced: calibration {attempt + 1}: -c{conns} -> {r['rps']:.0f} req/s "
              f"(target {target:.0f})", file=sys.stderr)
        if abs(ratio - 1) <= 0.08:
            break
        conns = max(1, round(conns / ratio))
        cmd_idle(argparse.Namespace(pid=_pids(a)[0] if _pids(a) else None, sleep=1, timeout=30))
    for run in range(1, a.runs + 1):
        cmd_idle(argparse.Namespace(pid=_pids(a)[0] if _pids(a) else None, sleep=1, timeout=30))
        a.run = run
        before = snapshot(_pids(a))
        r = run_wrk(a.pin, conns, a.duration, "paced_get.lua", url,
                    [token, str(a.mean_delay_ms), *headers])
        after = snapshot(_pids(a))
        _record(a, r, conns, before, after, target_rps=round(target, 1), peak_rps=round(a.peak, 1),
                mean_delay_ms=a.mean_delay_ms)


def cmd_mem(a):
    """GET /me in chunks sized from the observed rate; VmRSS of the worker read when the
    cumulative count first passes each step (the server is between wrk runs then)."""
    url, args = a.wrk_args[0], a.wrk_args[1:]
    if args and args[0] == "--":
        args = args[1:]
    steps = sorted(int(s) for s in a.steps.split(","))
    done, rate = 0, None
    _append(a.results, {"kind": "mem", "requests": 0, "rss_kb": _rss_kb(a.pid)})
    for step in steps:
        while done < step:
            remaining = step - done
            secs = 2 if rate is None else min(15, max(1, math.ceil(remaining / rate * 1.02)))
            r = run_wrk(a.pin, a.conns, f"{secs}s", "get.lua", url, args)
            if r["non2xx"] or r["connect"] + r["read"] + r["write"] + r["timeout"]:
                print(f"  mem: {r['non2xx']} non-2xx, errors in a chunk", file=sys.stderr)
            done += r["requests"]
            rate = r["rps"] if r["rps"] > 0 else 100.0
        rss = _rss_kb(a.pid)
        _append(a.results, {"kind": "mem", "requests": done, "step": step, "rss_kb": rss,
                            "rate": round(rate, 1)})
        print(f"  mem: after {done} GET /me requests: VmRSS {rss / 1024:.1f} MiB",
              file=sys.stderr)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"no VmRSS for pid {pid}")


def cmd_rss(a):
    print(_rss_kb(a.pid))


def cmd_seconds(a):
    print(_seconds(a.duration))


def cmd_mean_rps(a):
    rows = [r for r in _read(Path(a.results))
            if r.get("kind") == "wrk" and r["scenario"] == a.scenario]
    if not rows:
        raise SystemExit(f"no runs of {a.scenario} recorded")
    print(f"{statistics.mean(r['rps'] for r in rows):.1f}")


# -------------------------------------------------------------- token minting --


def cmd_mint(a):
    """Open COUNT live sessions through tessera's own code, on the same database, Redis and
    secret as the server (same TESSERA_* environment): tessera.main.create_app()'s lifespan, then
    tessera.domain.accounts.register_user() for fresh users and tessera.domain.accounts.Logins.open() (what login
    does after the password check) PER_USER times each, below tessera's cap on sessions per
    user. Only the logout scenario needs this: a login costs a bcrypt verify (~4/s per core),
    so real logins cannot supply thousands of sessions per run. The users get one real
    bcrypt_sha256 hash of --password, computed once and shared (so they can log in too)."""
    import random
    import secrets as _secrets

    async def main() -> list[str]:
        from tessera.domain import accounts
        from tessera.main import create_app

        app = create_app()
        tokens: list[str] = []
        async with app.router.lifespan_context(app):
            t = app.state.tessera
            stored = await t.hasher.hash(a.password)

            class OneHash:  # register_user asks its hasher for the hash: no bcrypt per user
                async def hash(self, _password: str) -> str:
                    return stored

            tag = _secrets.token_hex(4)
            policy = await t.policy.get()
            users = []
            for i in range(math.ceil(a.count / a.per_user)):
                async with t.db_factory() as db:
                    users.append(await accounts.register_user(
                        db, OneHash(), email=f"bench-mint-{tag}-{i}@example.com",  # type: ignore[arg-type]
                        password=a.password, policy=policy, accepted_policy=True))
            for user in users:
                n = min(a.per_user, a.count - len(tokens))
                epoch = await t.sessions.epoch(user.id)
                issued = await asyncio.gather(*(
                    t.logins.open(user, "tessera-bench (minted)", epoch=epoch)
                    for _ in range(n)))
                tokens.extend(i.token for i in issued if i is not None)
        random.shuffle(tokens)
        return tokens

    import logging
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    tokens = asyncio.run(main())
    Path(a.out).write_text("\n".join(tokens) + "\n")
    print(f"  mint: {len(tokens)} sessions ({math.ceil(a.count / a.per_user)} new users) in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)


def cmd_mint_users(a):
    """COUNT fresh users that can log in with --password (one shared real bcrypt_sha256 hash,
    as cmd_mint), through tessera's register_user on the server's database: one EMAIL line
    each. The login-flood scenario's other users: registering them over HTTP would cost a
    bcrypt hash each."""
    import secrets as _secrets

    async def main() -> list[str]:
        from tessera.domain import accounts
        from tessera.main import create_app

        app = create_app()
        emails: list[str] = []
        async with app.router.lifespan_context(app):
            t = app.state.tessera
            stored = await t.hasher.hash(a.password)

            class OneHash:  # register_user asks its hasher for the hash: no bcrypt per user
                async def hash(self, _password: str) -> str:
                    return stored

            tag = _secrets.token_hex(4)
            policy = await t.policy.get()
            for i in range(a.count):
                async with t.db_factory() as db:
                    user = await accounts.register_user(
                        db, OneHash(), email=f"bench-other-{tag}-{i}@example.com",  # type: ignore[arg-type]
                        password=a.password, policy=policy, accepted_policy=True)
                emails.append(str(user.email))
        return emails

    import logging
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    emails = asyncio.run(main())
    Path(a.out).write_text("\n".join(emails) + "\n")
    print(f"  mint-users: {len(emails)} users in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)


# TOTP users for the login-mfa scenarios: one two-step login per user per 30-s time step
# (tessera accepts each step's code once per user), so every login gets a user of its own.
TOTP_HORIZON_STEPS = 14  # codes written per mfa_token: the token's 300-s life and a margin


async def _mint_totp_users(t, password: str, count: int, tag: str) -> list[tuple]:
    """COUNT fresh users (one shared real bcrypt_sha256 hash of PASSWORD, as cmd_mint) with
    TOTP enrolled through tessera's domain functions: mfa.start_totp, then mfa.confirm_totp
    with the code of the previous time step (inside the drift window), so the current step
    is still unused and a login can spend it. Returns (user, secret) pairs."""
    import pyotp

    from tessera.domain import accounts
    from tessera.domain import mfa as dmfa
    from tessera.errors import Problem

    stored = await t.hasher.hash(password)

    class OneHash:  # register_user asks its hasher for the hash: no bcrypt per user
        async def hash(self, _password: str) -> str:
            return stored

    policy = await t.policy.get()
    out = []
    for i in range(count):
        async with t.db_factory() as db:
            user = await accounts.register_user(
                db, OneHash(), email=f"bench-totp-{tag}-{i}@example.com",  # type: ignore[arg-type]
                password=password, policy=policy, accepted_policy=True)
            secret = (await dmfa.start_totp(db, t.factors, user))["secret"]
            for attempt in (1, 2):
                previous = pyotp.TOTP(secret).at(time.time() - dmfa.TOTP_PERIOD)
                try:
                    await dmfa.confirm_totp(db, t.factors, user, previous)
                    break
                except Problem as problem:  # a step boundary passed since `previous`
                    if problem.code != "invalid_code" or attempt == 2:
                        raise
                    await db.refresh(user)  # the failed confirm rolled back (expired it)
        out.append((user, secret))
    return out


def cmd_mint_totp(a):
    """Users with TOTP enrolled (see _mint_totp_users), through tessera's own code on the
    server's database, Redis and secret (same TESSERA_* environment, like cmd_mint).
    Without --tokens: one `EMAIL SECRET` line per user (for the two-step login driver, which
    computes each code with pyotp when it sends it). With --tokens: the first step done for
    each user as POST /auth/login does it after the password check (mfa.enrolled, then
    mfa.mfa_required: a single-use mfa_token in Redis), one line per user:
    `MFA_TOKEN FIRST_STEP CODE...`, the pyotp codes of the time steps FIRST_STEP onwards, of
    which lua/login_mfa.lua sends the one of the step it sends the request in."""
    import secrets as _secrets

    import pyotp

    async def main() -> list[str]:
        from tessera.domain import mfa as dmfa
        from tessera.main import create_app

        app = create_app()
        lines: list[str] = []
        async with app.router.lifespan_context(app):
            t = app.state.tessera
            users = await _mint_totp_users(t, a.password, a.count, _secrets.token_hex(4))
            if not a.tokens:
                return [f"{u.email} {s}" for u, s in users]
            first = int(time.time() // dmfa.TOTP_PERIOD)
            from tessera.domain.profiles import generation_key
            for user, secret in users:
                # as accounts.authenticate: the epoch and the generation before the reads
                epoch, generation = await t.sessions.epoch_with(user.id, generation_key(user.id))
                async with t.db_factory() as db:
                    state = await dmfa.enrolled(db, user.id)
                problem = await dmfa.mfa_required(t.factors, user, ["pwd"], state,
                                                  epoch=epoch, generation=generation or "")
                assert problem is not None  # nothing ends this user's sessions meanwhile
                totp = pyotp.TOTP(secret)
                codes = [totp.at(s * dmfa.TOTP_PERIOD)
                         for s in range(first, first + TOTP_HORIZON_STEPS)]
                lines.append(" ".join([problem.extra["mfa_token"], str(first), *codes]))
        return lines

    import logging
    import random
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    lines = asyncio.run(main())
    random.shuffle(lines)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"  mint-totp: {len(lines)} users with TOTP"
          + (" and an mfa_token each" if a.tokens else "")
          + f" in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def cmd_mailflood(a):
    """Queue `--rate` mails a second for `--seconds` into the server's outbox, the way tessera
    queues them (one transaction per batch, as requests would), from this process: the
    server's worker then sends them (to .eml files on the bench's embedded defaults)."""
    from tessera.config import Settings
    from tessera.domain.mail import queue_mail
    from tessera.stores.db import create_engine, session_factory

    async def main() -> int:
        settings = Settings()
        engine = create_engine(settings.resolved_database_url)
        factory = session_factory(engine)
        tick, queued = 0.1, 0
        per_tick = max(1, round(a.rate * tick))
        start = time.monotonic()
        try:
            while time.monotonic() - start < a.seconds:
                async with factory() as db:
                    for _ in range(per_tick):
                        queue_mail(db, settings, user_id=None, to="bench-mail@example.com",
                                   kind="test", context={})
                    await db.commit()
                queued += per_tick
                await asyncio.sleep(max(0.0, start + queued / a.rate - time.monotonic()))
        finally:
            await engine.dispose()
        return queued

    queued = asyncio.run(main())
    print(f"mailflood: queued {queued} mails in {a.seconds:.0f} s", file=sys.stderr)


def cmd_check_tokens(a):
    """GET /me with the first/last N tokens of a file: all must answer EXPECT (200 before a
    logout run: the sessions are live; 401 after it: the logouts revoked them)."""
    tokens = [x for x in Path(a.file).read_text().split() if x]
    pick = tokens[: a.n] + (tokens[-a.n:] if a.tail else [])
    c = Client(a.base)
    got = [c.request("GET", "/me", headers={"Authorization": f"Bearer {t}"})[0] for t in pick]
    ok = all(g == a.expect for g in got)
    _append(a.results, {"kind": "check", "what": a.what, "expect": a.expect, "got": got, "ok": ok})
    if not ok:
        print(f"  WARNING: {a.what}: expected {a.expect}, got {got}", file=sys.stderr)


# --------------------------------------------------------------------- floors --


def cmd_floor(a):
    """bcrypt_sha256 (passlib, the server's scheme and cost) and a Redis GET round trip,
    in this process: pin it to the server's CPU while the server is idle."""
    import timeit

    from passlib.context import CryptContext

    ctx = CryptContext(schemes=["bcrypt_sha256"], bcrypt_sha256__rounds=a.rounds)
    pw = "correct-horse-battery-staple-42"
    h = ctx.hash(pw)
    out = []
    for name, fn in ((f"bcrypt_sha256 cost {a.rounds} hash (passlib)", lambda: ctx.hash(pw)),
                     (f"bcrypt_sha256 cost {a.rounds} verify (passlib)",
                      lambda: ctx.verify(pw, h))):
        ts = timeit.repeat(fn, number=1, repeat=a.repeat)
        out.append({"kind": "floor", "floor": name, "best_us": min(ts) * 1e6,
                    "median_us": statistics.median(ts) * 1e6, "unit": "per call"})
    if a.redis_port:
        async def rtt():
            import redis.asyncio as aredis
            r = aredis.Redis(host="127.0.0.1", port=a.redis_port)
            await r.set("bench:floor", "x" * 400)
            await r.get("bench:floor")
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(5000):
                    await r.get("bench:floor")
                ts.append((time.perf_counter() - t0) / 5000)
            await r.delete("bench:floor")
            await r.aclose()
            return ts
        try:
            import uvloop
            ts = uvloop.run(rtt())
        except ImportError:
            ts = asyncio.run(rtt())
        out.append({"kind": "floor", "floor": "Redis GET round trip (redis.asyncio, uvloop, "
                    "client on the server CPU)", "best_us": min(ts) * 1e6,
                    "median_us": statistics.median(ts) * 1e6, "unit": "per GET"})
    for rec in out:
        _append(a.results, rec)


def cmd_floor_totp(a):
    """What the TOTP check costs in-process, on the server's Redis (same TESSERA_*
    environment; pin it to the server CPU while the server idles): (1) the check alone,
    decrypting the stored secret and comparing the code with the three steps of the drift
    window (domain mfa.matching_step, pyotp); (2) what the full check (mfa.check_code_with)
    does with it: the check and the replay guard, one Redis script (mfa_login.accept_step);
    (3) what the one-script second step computes beside its script: the code's MAC for the
    three steps (SecretBox.totp_mac). Each timed call spends a later time step than the one
    before (the code of step s checked as at time s*30), so every guard really writes."""
    import pyotp

    async def main() -> list[dict]:
        from tessera.domain import mfa as dmfa
        from tessera.main import create_app
        from tessera.stores import mfa as store

        app = create_app()
        async with app.router.lifespan_context(app):
            t = app.state.tessera
            import secrets as _secrets
            ((user, secret),) = await _mint_totp_users(t, "floor-totp-password-0",
                                                       1, "floor-" + _secrets.token_hex(4))
            totp = pyotp.TOTP(secret)
            box = t.factors.box
            async with t.db_factory() as db:
                factor = await store.get_totp(db, user.id)
            assert factor is not None
            enc = factor.secret_enc
            step = int(time.time() // dmfa.TOTP_PERIOD) + 1
            check, full, full_cpu, macs = [], [], [], []

            async def totp_step(code: str, now: float) -> object:
                """The full check's TOTP part, by its own function (no database work)."""
                async with t.db_factory() as db:
                    return await dmfa.check_code_with(db, t.factors, user.id, code, factor,
                                                      now=now)

            for _ in range(a.n):
                code = totp.at(step * dmfa.TOTP_PERIOD)
                t0 = time.perf_counter()
                found = dmfa.matching_step(box.decrypt(enc, user.id), code,
                                           now=step * dmfa.TOTP_PERIOD)
                check.append(time.perf_counter() - t0)
                assert found == step
                step += 1
                # The full check with its replay guard (one Redis script). The code is of
                # the current time step's neighbourhood only at real time, so the check runs
                # as at time step*30, as above.
                code = totp.at(step * dmfa.TOTP_PERIOD)
                t0 = time.perf_counter()
                for s_ in (step - 1, step, step + 1):
                    box.totp_mac(user.id, s_, code)
                macs.append(time.perf_counter() - t0)
                c0, t0 = time.process_time(), time.perf_counter()
                earned = await totp_step(code, step * dmfa.TOTP_PERIOD)
                full.append(time.perf_counter() - t0)
                full_cpu.append(time.process_time() - c0)
                if not earned:
                    raise SystemExit("floor-totp: a fresh time step was refused")
                step += 1
        return [
            {"kind": "floor", "floor": "TOTP check: decrypt secret + 3 codes of the drift "
             "window (mfa.matching_step, pyotp)", "best_us": min(check) * 1e6,
             "median_us": statistics.median(check) * 1e6, "unit": "per check"},
            {"kind": "floor", "floor": "the one-script second step's own work beside its "
             "script: the code's MAC for 3 time steps (SecretBox.totp_mac)",
             "best_us": min(macs) * 1e6, "median_us": statistics.median(macs) * 1e6,
             "unit": "per step"},
            {"kind": "floor", "floor": "TOTP step as the full check does it: check + replay "
             "guard (mfa_login.accept_step, one Redis script), wall",
             "best_us": min(full) * 1e6,
             "median_us": statistics.median(full) * 1e6, "unit": "per step", "totp": True},
            {"kind": "floor", "floor": "the same, CPU time of this process (no fsync or "
             "scheduling wait)", "best_us": min(full_cpu) * 1e6,
             "median_us": statistics.median(full_cpu) * 1e6, "unit": "per step",
             "totp_cpu": True},
        ]

    import logging
    logging.disable(logging.WARNING)
    try:
        import uvloop
        out = uvloop.run(main())
    except ImportError:
        out = asyncio.run(main())
    for rec in out:
        _append(a.results, rec)
        print(f"  floor: {rec['floor']}: median {_fmt_us(rec['median_us'])}", file=sys.stderr)


# ---------------------------------------------------------------------- misc --


def cmd_pg_reset(a):
    """Drop and create the bench database named in a postgresql:// URL (never `test`)."""
    u = urllib.parse.urlsplit(a.url)
    name = u.path.lstrip("/")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or "") or name in (
            "test", "postgres", "template0", "template1"):
        raise SystemExit(f"refusing to reset database {name!r}: give a dedicated bench "
                         "database, e.g. .../tessera_bench")

    async def main():
        import asyncpg
        admin = urllib.parse.urlunsplit(("postgresql", u.netloc, "/postgres", u.query, ""))
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(main())
    print(f"  postgres: database {name} recreated", file=sys.stderr)


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if rec.get("kind") == "wrk":
        print(f"  {rec['scenario']:12} run {rec['run']} -c{rec['conns']:<3}: "
              f"{rec['rps']:9.1f} req/s  p50 {_ms(rec['p50_us'])}  p99 {_ms(rec['p99_us'])}"
              + (f"  non-2xx {rec['non2xx']}" if rec["non2xx"] else "")
              + (f"  errors {rec['errors']}" if rec["errors"] else "")
              + (f"  [other work on the server CPU: {rec['foreign_on_server_cpu']:.0%}]"
                 if rec.get("foreign_on_server_cpu", 0) > 0.05 else "")
              + (f"  [other work on the load CPU: {rec['foreign_on_load_cpu']:.0%}]"
                 if rec.get("foreign_on_load_cpu", 0) > 0.10 else ""), file=sys.stderr)


def _ms(us: float) -> str:
    if us != us:  # nan
        return "-"
    return f"{us / 1000:.2f} ms" if us < 1e6 else f"{us / 1e6:.2f} s"


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ------------------------------------------------------------ profile summary --

# Where a sample's time goes: walk its stack from the leaf up, the first frame that belongs
# to one of these layers takes the sample (library helpers such as json, re, secrets or
# prometheus_client count for the layer that called them). The rows sum to 100%.
def _layer(frame: str) -> str | None:
    m = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return None
    fn, file = m.groups()
    cls = fn.split(".")[0]
    if "/redis/" in file or file.startswith("redis/") or "hiredis" in file:
        return "Redis client (redis-py: pack command, read/parse reply, connection pool)"
    if file.endswith("app/sessions.py"):
        return "tessera SessionStore (session + profile MGET, JSON decode, hash compare)"
    if file.endswith("app/profiles.py"):
        return "tessera ProfileCache (app/profiles.py)"
    if file.endswith("app/api/deps.py"):
        return "tessera auth dependencies (app/api/deps.py)"
    if "app/api/" in file:
        return f"tessera endpoint ({file[file.index('app/api/'):]})"
    if "app/security/" in file:
        return "tessera token peek/hash (app/security/)"
    if file.endswith("app/usage.py"):
        return "tessera usage log: record() (app/usage.py)"
    if file.endswith("app/privacy.py"):
        return "PrivacyMiddleware (DNT/GPC, Tk, Vary, visitor cookie, usage event)"
    if file.endswith("app/metrics.py"):
        return "MetricsMiddleware (app/metrics.py + prometheus_client)"
    if file.endswith("app/middleware.py"):
        return f"{cls} (app/middleware.py)"
    if file.endswith("app/errors.py"):
        return "tessera error handling (app/errors.py)"
    if "anyio/" in file or fn.startswith("run_in_threadpool"):
        return "thread hop: sync dependency run in the threadpool (run_in_threadpool, anyio)"
    if "pydantic" in file:
        return "pydantic"
    if "fastapi/" in file:
        return "FastAPI (routing, dependency solving, response serialisation)"
    if "starlette/" in file:
        return "Starlette (routing, Request/Response, exception middleware)"
    if "uvicorn/" in file:
        return "uvicorn (httptools protocol, ASGI request/response cycle)"
    return None


_IDLE_LEAVES = ("Condition.wait (threading.py", "_connection_worker_thread (aiosqlite/core.py:59)",
                "Queue.get (queue.py", "Event.wait (threading.py", "select (selectors.py")


def _parse_raw(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        stacks.append((stack.split(";"), n))
    return stacks


def _func(frame: str) -> str:
    """'get_me (/x/site-packages/app/api/me.py:120)' -> 'get_me (app/api/me.py)'."""
    m = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    name, file = m.groups()
    for marker in ("site-packages/", "/lib/python3.", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker == "/lib/python3.":
                file = "stdlib/" + file.split("/", 1)[1]
            break
    return f"{name} ({file})"


def profile_summary(raw: Path, top: int = 15) -> str:
    stacks = _parse_raw(raw)
    if not stacks:
        return "(no samples)"
    main = [(f[1:], n) for f, n in stacks if len(f) > 1 and "MainThread" in f[0]]
    others = [(f, n) for f, n in stacks
              if f and "MainThread" not in f[0] and not f[-1].startswith(_IDLE_LEAVES)]
    ltotal = sum(n for _, n in main)
    if not ltotal:
        return "(no samples of the main thread)"
    otot = sum(n for _, n in others)
    busy: dict[str, int] = {}
    for f, n in others:
        key = f"{f[0].split(': ', 1)[-1].split(' (')[0]}: {_func(f[-1])}"
        busy[key] = busy.get(key, 0) + n
    lines = [f"{ltotal} samples of the event-loop thread (MainThread). Other threads, idle "
             f"waits left out: {otot} samples"
             + (" — " + "; ".join(f"{k} {v}" for k, v in sorted(busy.items(),
                                                                key=lambda x: -x[1])[:4])
                if busy else "") + "."]
    buckets: dict[str, int] = {}
    for frames, n in main:
        layer = next((lay for lay in map(_layer, reversed(frames)) if lay), None)
        layer = layer or "event loop itself (uvloop/asyncio: scheduling, socket I/O, epoll)"
        buckets[layer] = buckets.get(layer, 0) + n
    lines += ["", "Event-loop time by layer (each sample counted once, for the innermost layer "
              "on its stack; helpers such as json or secrets count for the layer that called "
              "them):", "", "| layer | share |", "|---|---|"]
    for layer, n in sorted(buckets.items(), key=lambda x: -x[1]):
        lines.append(f"| {layer} | {n / ltotal:.1%} |")
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    for frames, n in main:
        leaf = _func(frames[-1])
        self_t[leaf] = self_t.get(leaf, 0) + n
        for fn in {_func(x) for x in frames}:
            incl[fn] = incl.get(fn, 0) + n
    lines += ["", f"Top {top} functions by self time (leaf frame; C code shows as its caller):",
              "", "| self | function |", "|---|---|"]
    for fn, n in sorted(self_t.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"| {n / ltotal:.1%} | `{fn}` |")
    lines += ["", "Inclusive time of tessera code and of a few framework steps (rows nest: the "
              "middlewares wrap each other, outermost first):", "", "| inclusive | function |",
              "|---|---|"]
    keep = [(fn, n) for fn, n in incl.items()
            if ("(app/" in fn and n < 0.99 * ltotal)
            or fn.split(" ")[0] in ("solve_dependencies", "run_in_threadpool",
                                    "serialize_response", "jsonable_encoder",
                                    "JSONResponse.render", "HttpToolsProtocol.data_received",
                                    "RequestResponseCycle.send")]
    for fn, n in sorted(keep, key=lambda x: -x[1])[:top + 8]:
        lines.append(f"| {n / ltotal:.1%} | `{fn}` |")
    return "\n".join(lines)


def cmd_profile_summary(a):
    print(profile_summary(Path(a.raw), a.top))


# --------------------------------------------------------------------- report --

SCENARIOS = [  # (scenario, label) in table order
    ("register", "POST /auth/register"),
    ("login", "POST /auth/login"),
    ("login-mfa", "two-step login with TOTP: POST /auth/login + POST /auth/login/mfa "
                  "(pyotp code); req/s = logins/s"),
    ("login-py", "POST /auth/login by the login-mfa driver (its like-for-like baseline)"),
    ("login-mfa-step", "POST /auth/login/mfa alone (pre-made mfa_tokens)"),
    ("me", "GET /me (bearer)"),
    ("check", "GET /auth/check (forward auth)"),
    ("introspect", "POST /auth/introspect"),
    ("logout", "POST /auth/logout"),
    ("me-dnt", "GET /me, DNT: 1 (no usage log)"),
    ("mixed-me", "GET /me while one client logs in back to back"),
    ("mixed-login", "POST /auth/login, that one client"),
    ("me-half", "GET /me paced at ~half its peak"),
    ("me-half-dnt", "the same with DNT: 1 (no usage log; diagnostic, no target)"),
    ("me-mail", "GET /me while 100 mails/s are queued (the worker writes them out)"),
    ("login-others", "POST /auth/login, other users each once (login-mfa driver), no flood"),
    ("login-flood", "the same while one account loops on its correct password (default "
                    "per-account limits)"),
    ("login-flood-attacker", "POST /auth/login, the flooding account (wrk; 429 past its "
                             "limit)"),
    # issue 11's pairs, each pair's runs alternated ABBA (run.sh `pairs`)
    ("pair-raw-ping", "pairs: GET /ping, raw ASGI app (no framework, no I/O)"),
    ("pair-introspect", "pairs: POST /auth/introspect, alternated with raw /ping"),
    ("pair-raw-redis", "pairs: GET /redis-ping, raw ASGI app (one Redis GET)"),
    ("pair-me", "pairs: GET /me, alternated with raw /redis-ping"),
    ("pair-fastapi-ping", "pairs: GET /ping, bare FastAPI"),
    ("pair-healthz", "pairs: GET /healthz, alternated with FastAPI /ping"),
    ("pair-me-check", "pairs: GET /me, alternated with /auth/check"),
    ("pair-check", "pairs: GET /auth/check, alternated with GET /me"),
]
# issue 11's ratios from the pairs: (tessera scenario, reference scenario, target, goal)
PAIRS = [
    ("pair-me", "pair-raw-redis", "GET /me vs raw ASGI /redis-ping", 1.0),
    ("pair-introspect", "pair-raw-ping", "introspection vs raw ASGI /ping", 0.3),
    ("pair-healthz", "pair-fastapi-ping", "GET /healthz vs bare FastAPI GET /ping", 0.8),
    ("pair-check", "pair-me-check", "GET /auth/check vs GET /me", 0.9),
]
# the quiet check before a scenario is labelled with the first word of its name
_PROBE_LABEL = {**{name: "pairs" for name, _ in SCENARIOS if name.startswith("pair-")},
                "me-dnt": "me", "mixed-me": "mixed", "mixed-login": "mixed",
                "me-half-dnt": "me-half", "login-mfa-step": "login-mfa", "login-py": "login-mfa",
                "me-mail": "mail", "login-others": "login-flood",
                "login-flood-attacker": "login-flood"}


# bcrypt-bound scenarios: a handful of connections, each request ~0.25-1 s, completing in
# bursts; wrk's count (completed / duration) drops the burst in flight at the end (up to
# conns / (rate * duration), 10% at -c4 for 10 s), so their req/s is conns / mean latency.
LITTLE = {"register", "login", "mixed-login", "login-mfa", "login-py", "login-others",
          "login-flood"}


def _summ(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    if rows[0]["scenario"] in LITTLE:
        rows = [{**r, "rps_wrk": r["rps"], "rps": r["rps_little"]} for r in rows]
    return {"rps": statistics.mean(r["rps"] for r in rows),
            "rps_wrk": statistics.mean(r.get("rps_wrk", r["rps"]) for r in rows),
            "p50_us": statistics.mean(r["p50_us"] for r in rows),
            "p99_us": max(r["p99_us"] for r in rows),
            "conns": rows[0]["conns"], "runs": len(rows),
            "non2xx": sum(r["non2xx"] for r in rows), "errors": sum(r["errors"] for r in rows),
            "spread": (max(r["rps"] for r in rows) - min(r["rps"] for r in rows))
            / max(1e-9, statistics.mean(r["rps"] for r in rows)),
            "foreign": max((r.get("foreign_on_server_cpu", 0) for r in rows), default=0),
            "exhausted": sum(r.get("exhausted", 0) for r in rows),
            # login-mfa: each step's latency within the two-step login
            **({k: statistics.mean(r[k] for r in rows) for k in ("step1_p50_us", "step2_p50_us")}
               if all("step2_p50_us" in r for r in rows) else {})}


def cmd_report(a):
    state = Path(a.state)
    recs = _read(state / "results.jsonl")
    shared = _read(Path(a.shared_results)) if a.shared_results else []
    wrk = [r for r in recs if r["kind"] == "wrk"]
    by = {s: _summ([r for r in wrk if r["scenario"] == s]) for s, _ in SCENARIOS}
    floors = [r for r in recs if r["kind"] == "floor"]
    mem = [r for r in recs if r["kind"] == "mem"]
    bg = [r for r in recs if r["kind"] == "background"]
    meta = next((r for r in recs if r["kind"] == "meta"), {})
    md: list[str] = []
    w = md.append

    w(f"# tessera benchmark — {meta.get('date', '?')}")
    w("")
    w(f"Machine: {meta.get('nproc', '?')} CPUs ({meta.get('cpu', '?')}), "
      f"{meta.get('mem_gib', '?')} GiB RAM, {meta.get('kernel', '?')}; Python "
      f"{meta.get('python', '?')}; database {meta.get('database', '?')}; tessera "
      f"{meta.get('commit', '?')}.")
    w(f"Server (tessera serve --workers 1, its Redis) on CPU {meta.get('server_cpu', 0)}, "
      f"wrk on CPU {meta.get('load_cpu', 1)}; wrk -t1, {meta.get('duration')} per run after a "
      f"{meta.get('warmup')} warm-up, {meta.get('runs')} runs per scenario: req/s and p50 are "
      "the mean of the runs, p99 the worst run.")
    if bg:
        worst = max(max(v for k, v in r.items() if k.endswith("_busy")) for r in bg)
        la = [r["loadavg"][0] for r in bg]
        foreign = max((r.get("foreign_on_server_cpu", 0) for r in wrk), default=0)
        # (the two wrk of the mixed scenario count each other as other work: left out)
        lforeign = max((r.get("foreign_on_load_cpu", 0) for r in wrk
                        if not r["scenario"].startswith("mixed")), default=0)
        probes = [r["probe_ms"] for r in bg if r.get("probe_ms")]
        swing = (max(probes) / min(probes) - 1) if probes else 0.0
        disturbed = worst > 0.10 or foreign > 0.10 or lforeign > 0.20 or swing > 0.10
        w(f"Quiet check: load average {min(la):.2f}–{max(la):.2f}; busiest CPU between "
          f"scenarios {worst:.0%} (our servers idle); during a run, other work took at most "
          f"{foreign:.0%} of the server CPU and {lforeign:.0%} of the load CPU "
          "(Python helpers and py-spy of this harness count as other work there); speed probe "
          + (f"{min(probes):.1f}–{max(probes):.1f} ms (a fixed Python loop on the server CPU; "
             f"{swing:.0%} swing). " if probes else "n/a. ")
          + ("**Disturbed: other work ran on the machine; treat the figures with care.**"
             if disturbed else "Undisturbed."))
    for c in (r for r in recs if r["kind"] == "check" and not r["ok"]):
        w(f"**Check failed: {c['what']}: expected {c['expect']}, got {c['got']}.**")
    w("")
    w("## Scenarios")
    w("")
    probe = {r["label"]: r.get("probe_ms") for r in bg}
    w("| scenario | request | conns | req/s | p50 | p99 | runs (spread) | non-2xx | errors "
      "| speed probe before |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for s, label in SCENARIOS:
        x = by.get(s)
        if not x:
            continue
        note = f" (~{wrk_target(wrk, s)}/s offered)" if s.startswith("me-half") else ""
        dag = "†" if s in LITTLE else ""
        w(f"| {s} | {label}{note} | {x['conns']} | {x['rps']:.{2 if dag else 1}f}{dag} | {_ms(x['p50_us'])} | "
          f"{_ms(x['p99_us'])} | {x['runs']} (±{x['spread'] / 2:.0%}) | {x['non2xx']} | "
          f"{x['errors']}{' (**tokens ran out: ' + str(x['exhausted']) + ' requests without one**)' if x['exhausted'] else ''} | "
          f"{(str(probe.get(_PROBE_LABEL.get(s, s))) + ' ms') if probe.get(_PROBE_LABEL.get(s, s)) else '-'} |")
    if by.get("login-mfa") and "step2_p50_us" in by["login-mfa"]:
        x = by["login-mfa"]
        w("")
        w(f"login-mfa, each step within the two-step login (p50): password step "
          f"{_ms(x['step1_p50_us'])}, TOTP step {_ms(x['step2_p50_us'])}; driven by "
          "`benchtool.py login-mfa` (Python threads, one keep-alive connection each), not wrk.")
    attacker = [r for r in wrk if r["scenario"] == "login-flood-attacker"]
    if attacker:
        ok = sum(r["requests"] - r["non2xx"] for r in attacker)
        n = sum(r["requests"] for r in attacker)
        secs = sum(r.get("duration_s", 0) or 0 for r in attacker)
        rate = f" ({n / secs:.0f}/s)" if secs else ""
        w("")
        w(f"login-flood: the flooding account sent {n} logins in {len(attacker)} run(s){rate}; "
          f"{ok} answered 200 (each a bcrypt verify), the rest 429 `too_many_attempts`. Each "
          "run floods with a fresh account from its first second, so the figure includes the "
          "burst a flood gets before its account's window (30 verifies a minute, 2 at a time) "
          "is spent; a run of 60 s or more shows a whole window.")
    if any(by.get(s) for s in LITTLE):
        w("")
        w("† bcrypt-bound: req/s = connections / mean latency (Little's law), because wrk's "
          "count drops the burst still in flight when the run ends; wrk's count gave "
          + ", ".join(f"{s} {by[s]['rps_wrk']:.2f}" for s in sorted(LITTLE) if by.get(s))
          + " req/s.")
    w("")

    # ---- targets
    def shared_rps(target, scenario):
        rows = [r for r in shared if r.get("target") == target and r.get("scenario") == scenario]
        return statistics.mean(r["rps"] for r in rows) if rows else None

    peer_me = shared_rps("peer", "me")
    ping = shared_rps("baseline", "ping")
    verify = next((f for f in floors if f["floor"].startswith("bcrypt") and "verify" in f["floor"]),
                  None)
    hashf = next((f for f in floors if f["floor"].startswith("bcrypt") and "hash" in f["floor"]),
                 None)
    totp_floor = next((f for f in floors if f.get("totp")), None)
    targets = []

    def target(name, measured, ratio, goal, ok):
        targets.append((name, measured, ratio, goal, ok))

    me, dnt = by.get("me"), by.get("me-dnt")
    if me and peer_me:
        r = me["rps"] / peer_me
        target("GET /me vs fastapi-users GET /users/me", f"{me['rps']:.0f} vs {peer_me:.0f} req/s",
               f"{r:.2f}×", "≥ 10×", r >= 10)
    t_me = shared_rps("tessera", "me")
    if t_me and peer_me:
        r = t_me / peer_me
        target("(cross-check: both figures from shared/bench/run.sh)",
               f"{t_me:.0f} vs {peer_me:.0f} req/s", f"{r:.2f}×", "≥ 10×", r >= 10)
    # Issue 11: the one edge and the lean endpoints, each against the framework-free ASGI app
    # (`raw`) and bare FastAPI: first as pairs alternated ABBA in this run (run.sh `pairs`),
    # then from the shared run, where each figure was taken minutes from the other.
    for mine, ref, name, goal in PAIRS:
        if by.get(mine) and by.get(ref):
            r = by[mine]["rps"] / by[ref]["rps"]
            target(f"{name} (pair, runs alternated ABBA)",
                   f"{by[mine]['rps']:.0f} vs {by[ref]['rps']:.0f} req/s", f"{r:.2f}×",
                   f"≥ {goal}×", r >= goal)
    raw_ping, raw_redis = shared_rps("raw", "ping"), shared_rps("raw", "redis-ping")
    t_health, t_logout = shared_rps("tessera", "healthz"), shared_rps("tessera", "logout")
    peer_logout = shared_rps("peer", "logout")
    if t_me and raw_redis:
        r = t_me / raw_redis
        target("GET /me vs raw ASGI /redis-ping (one plain Redis GET; shared run)",
               f"{t_me:.0f} vs {raw_redis:.0f} req/s", f"{r:.2f}×", "≥ 1.0×", r >= 1.0)
    t_in_shared = shared_rps("tessera", "introspect")
    if t_in_shared and raw_ping:
        r = t_in_shared / raw_ping
        target("introspection vs raw ASGI /ping (shared run)", f"{t_in_shared:.0f} vs {raw_ping:.0f} req/s",
               f"{r:.2f}×", "≥ 0.3×", r >= 0.3)
    if t_health and ping:
        r = t_health / ping
        target("GET /healthz vs bare FastAPI GET /ping (shared run)", f"{t_health:.0f} vs {ping:.0f} req/s",
               f"{r:.2f}×", "≥ 0.8×", r >= 0.8)
    if t_logout and peer_logout:
        r = t_logout / peer_logout
        target("logout vs fastapi-users logout (one connection, sequential)",
               f"{t_logout:.0f} vs {peer_logout:.0f} req/s", f"{r:.2f}×", "≥ 1.0×", r >= 1.0)
    always_path = Path(a.state) / "logout-always.jsonl"
    always = [json.loads(x) for x in always_path.read_text().splitlines() if x.strip()] \
        if always_path.exists() else []
    if always and peer_logout:
        t_always = statistics.mean(r["rps"] for r in always)
        r = t_always / peer_logout
        target("(the same on appendfsync always: an fsync per logout; fastapi-users' Redis "
               "persists nothing)", f"{t_always:.0f} vs {peer_logout:.0f} req/s", f"{r:.2f}×",
               "— (for reference)", None)
    if me and by.get("check"):
        r = by["check"]["rps"] / me["rps"]
        target("GET /auth/check vs GET /me (scenarios check and me)", f"{by['check']['rps']:.0f} vs {me['rps']:.0f} req/s",
               f"{r:.2f}×", "≥ 0.9×", r >= 0.9)
    if by.get("introspect") and ping:
        r = by["introspect"]["rps"] / ping
        target("introspection vs bare FastAPI GET /ping",
               f"{by['introspect']['rps']:.0f} vs {ping:.0f} req/s", f"{r:.0%}", "≥ 50%", r >= 0.5)
    t_in = shared_rps("tessera", "introspect")
    if t_in and ping:
        r = t_in / ping
        target("(cross-check: both figures from shared/bench/run.sh)",
               f"{t_in:.0f} vs {ping:.0f} req/s", f"{r:.0%}", "≥ 50%", r >= 0.5)
    if by.get("login") and verify:
        cap = 1e6 / verify["median_us"]
        r = by["login"]["rps"] / cap
        target("login vs bcrypt alone on the server core",
               f"{by['login']['rps']:.2f} vs {cap:.2f} verifies/s", f"{r:.0%}", "≥ 90%", r >= 0.9)
    lm, lms, lpy = by.get("login-mfa"), by.get("login-mfa-step"), by.get("login-py")
    if lm and lpy and lpy["rps"] > 0:
        r = lm["rps"] / lpy["rps"]
        target("login with TOTP vs plain login (two-step logins/s vs logins/s, same driver, "
               "runs alternated)", f"{lm['rps']:.2f} vs {lpy['rps']:.2f} /s", f"{r:.0%}",
               "≥ 90%", r >= 0.9)
    if lm and by.get("login") and by["login"]["rps"] > 0:
        r = lm["rps"] / by["login"]["rps"]
        target("(the same vs the wrk login scenario)",
               f"{lm['rps']:.2f} vs {by['login']['rps']:.2f} /s", f"{r:.0%}", "≥ 90%", r >= 0.9)
    if lms and verify:
        r = lms["p50_us"] / verify["median_us"]
        target(f"second step alone (POST /auth/login/mfa, -c{lms['conns']}) p50 vs one bcrypt "
               "verify", f"{_ms(lms['p50_us'])} vs {_ms(verify['median_us'])} (server time "
               f"per step ≈ 1 / req/s = {_ms(1e6 / lms['rps']) if lms['rps'] else '-'})",
               f"{r:.1%}", "≤ 10%", r <= 0.10)
    cost = next((r for r in recs if r["kind"] == "mfa-cost"), None)
    if cost and verify:
        r = cost["cpu_us"] / verify["median_us"]
        target(f"second step, server CPU per step (one client, {cost['steps']} steps in a "
               "row; the issue: a TOTP login costs one bcrypt verify plus well under 1 ms)",
               f"{_fmt_us(cost['cpu_us'])} (+ Redis {_fmt_us(cost['redis_cpu_us'])}) vs "
               f"{_ms(verify['median_us'])}", f"{r:.1%}", "< 1 ms", cost["cpu_us"] < 1000)
        if cost.get("healthz_cpu_us"):
            target("(the same host meanwhile: GET /healthz one at a time, its blocks alternated "
                   "with the steps'; the step costs this many empty requests)",
                   _fmt_us(cost["healthz_cpu_us"]),
                   f"{cost['cpu_us'] / cost['healthz_cpu_us']:.1f}×", "—", None)
        r = cost["wall_p50_us"] / verify["median_us"]
        target("second step, wall time per step, one sequential client (p50) vs one bcrypt "
               "verify", f"{_fmt_us(cost['wall_p50_us'])} vs {_ms(verify['median_us'])}",
               f"{r:.1%}", "≤ 10%", r <= 0.10)
        target("second step: Redis commands sent per step (MONITOR; each a round trip, "
               "each write one fsync on the durable Redis)",
               f"{cost['redis_commands']:.1f} ({cost['redis_scripts']:.1f} scripts: "
               f"{', '.join(cost['redis_command_names'])})", "—", "—", None)
    if totp_floor:
        target("TOTP step in-process, the full check (check + replay guard in Redis; floor "
               "table), wall",
               _fmt_us(totp_floor["median_us"]), "—", "< 1 ms", totp_floor["median_us"] < 1000)
    totp_cpu = next((f for f in floors if f.get("totp_cpu")), None)
    if totp_cpu:
        target("(the same, CPU time)", _fmt_us(totp_cpu["median_us"]), "—", "< 1 ms",
               totp_cpu["median_us"] < 1000)
    if by.get("register") and hashf:
        cap = 1e6 / hashf["median_us"]
        r = by["register"]["rps"] / cap
        target("register vs bcrypt alone (no target; for reference)",
               f"{by['register']['rps']:.2f} vs {cap:.2f} hashes/s", f"{r:.0%}", "—", None)
    # Issue 12.3: one account looping on a correct login must not slow other users' logins
    # (before the per-account bound on bcrypt work: 0.40 s -> 5 s). No goal in the issue.
    flood, others = by.get("login-flood"), by.get("login-others")
    if flood and verify:
        target(f"other users' login under a one-account login flood (-c{flood['conns']}), "
               "p50 / p99 vs one bcrypt verify",
               f"{_ms(flood['p50_us'])} / {_ms(flood['p99_us'])} vs {_ms(verify['median_us'])}",
               f"{flood['p50_us'] / verify['median_us']:.2f}× / "
               f"{flood['p99_us'] / verify['median_us']:.2f}×", "—", None)
    if flood and others:
        target("(the same vs those logins without the flood, same driver, runs alternated)",
               f"p50 {_ms(flood['p50_us'])} vs {_ms(others['p50_us'])}, p99 "
               f"{_ms(flood['p99_us'])} vs {_ms(others['p99_us'])}",
               f"{flood['p50_us'] / others['p50_us']:.2f}× / "
               f"{flood['p99_us'] / others['p99_us']:.2f}×", "—", None)
    if me and by.get("mixed-me"):
        r = by["mixed-me"]["rps"] / me["rps"]
        target("mixed: GET /me under a back-to-back login vs solo",
               f"{by['mixed-me']['rps']:.0f} vs {me['rps']:.0f} req/s", f"{r:.0%}", "≥ 40%",
               r >= 0.4)
    if me and by.get("me-mail"):
        r = by["me-mail"]["rps"] / me["rps"]
        target("GET /me while 100 mails/s are queued vs solo",
               f"{by['me-mail']['rps']:.0f} vs {me['rps']:.0f} req/s", f"{r:.0%}", "≥ 95%",
               r >= 0.95)
    if me and dnt:
        r = 1 - me["rps"] / dnt["rps"]
        target("usage logging on vs off (DNT: 1)",
               f"{me['rps']:.0f} vs {dnt['rps']:.0f} req/s",
               f"{r:.1%} fewer" if r >= 0 else f"{-r:.1%} more (noise)", "≤ 10% fewer",
               r <= 0.10)
    if by.get("me-half"):
        h = by["me-half"]
        target("GET /me p99 at ~half its peak",
               f"p99 {_ms(h['p99_us'])} at {h['rps']:.0f} req/s "
               f"({h['rps'] / me['rps']:.0%} of peak)" if me else _ms(h["p99_us"]),
               _ms(h["p99_us"]), "< 10 ms", h["p99_us"] < 10_000)
    steps = [m for m in mem if m.get("step")]
    if len(steps) >= 2:
        m1, m2 = steps[0], steps[-1]
        r = m2["rss_kb"] / m1["rss_kb"] - 1
        target(f"worker RSS growth, {m1['requests']} → {m2['requests']} GET /me",
               f"{m1['rss_kb'] / 1024:.1f} → {m2['rss_kb'] / 1024:.1f} MiB", f"{r:+.1%}",
               "< 10%", r < 0.10)
    w("## Targets")
    w("")
    w("| target | measured | ratio | goal | met |")
    w("|---|---|---|---|---|")
    for name, measured, ratio, goal, ok in targets:
        w(f"| {name} | {measured} | {ratio} | {goal} | "
          f"{'—' if ok is None else ('yes' if ok else '**no**')} |")
    w("")
    if mem:
        w("## Memory (VmRSS of the worker, /proc/<pid>/status)")
        w("")
        w("| GET /me requests served (this phase) | VmRSS |")
        w("|---|---|")
        for m in mem:
            w(f"| {m['requests']} | {m['rss_kb'] / 1024:.1f} MiB |")
        w("")
    if floors:
        w("## Physical floor (in-process, pinned to the server CPU, server idle)")
        w("")
        w("| operation | best | median | → per second |")
        w("|---|---|---|---|")
        for f in floors:
            w(f"| {f['floor']} | {_fmt_us(f['best_us'])} | {_fmt_us(f['median_us'])} | "
              f"{1e6 / f['median_us']:.1f} |")
        w("")
    if shared:
        w("## Side by side (shared/bench/run.sh, same run, same pinning)")
        w("")
        if probe.get("shared"):
            w(f"Speed probe before: {probe['shared']} ms.")
            w("")
        w("| target | scenario | request | conns | req/s (mean) | p50 | p99 (worst) | non-2xx |")
        w("|---|---|---|---|---|---|---|---|")
        keys = list(dict.fromkeys((r["target"], r["scenario"]) for r in shared))
        for tgt, sc in keys:
            rows = [r for r in shared if (r["target"], r["scenario"]) == (tgt, sc)]
            w(f"| {tgt} | {sc} | {rows[0]['request']} | {rows[0]['conns']} | "
              f"{statistics.mean(r['rps'] for r in rows):.1f} | "
              f"{_ms(statistics.mean(r['p50_us'] for r in rows))} | "
              f"{_ms(max(r['p99_us'] for r in rows))} | {sum(r['non2xx'] for r in rows)} |")
        w("")
    if a.profile and Path(a.profile).exists():
        w("## Profile: GET /me under load (py-spy)")
        w("")
        pw = Path(a.profile).with_name("profile.wrk.txt")
        line = next((x for x in (pw.read_text().splitlines() if pw.exists() else [])
                     if x.startswith("WRK_RESULT ")), None)
        if line:
            r = json.loads(line.split(" ", 1)[1])
            w(f"Recorded while wrk drove GET /me at {r['rps']:.0f} req/s (-c"
              f"{meta.get('conns', '?')}, py-spy sampling included); flame graph: "
              f"`{Path(a.profile).with_suffix('.svg').name}` beside this file.")
            w("")
        w(profile_summary(Path(a.profile)))
        w("")
    text = "\n".join(md)
    Path(a.out).write_text(text + "\n")
    print(text)


def wrk_target(wrk: list[dict], scenario: str) -> str:
    t = [r.get("target_rps") for r in wrk if r["scenario"] == scenario and r.get("target_rps")]
    return f"{t[0]:.0f}" if t else "?"


def _fmt_us(us: float) -> str:
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us:.1f} µs"


def cmd_meta(a):
    import platform
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                      if x.startswith("MemTotal")).split()[1])
    try:
        commit = subprocess.run(["git", "-C", str(HERE.parent), "log", "-1", "--format=%h %s"],
                                capture_output=True, text=True).stdout.strip()[:80]
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "app"],
                               capture_output=True, text=True).stdout.strip()
        commit += " (+ uncommitted changes in app/)" if dirty else ""
    except OSError:
        commit = "?"
    _append(a.results, {"kind": "meta", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem_kb / 2**20, 1),
                        "kernel": platform.release(), "python": platform.python_version(),
                        "database": a.database, "commit": commit, "duration": a.duration,
                        "warmup": a.warmup, "runs": a.runs, "server_cpu": a.server_cpu,
                        "load_cpu": a.load_cpu, "conns": a.conns})


# ----------------------------------------------------------------------- main --


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("wait-http"); s.add_argument("url")
    s.add_argument("--timeout", type=float, default=60); s.set_defaults(fn=cmd_wait_http)
    s = sub.add_parser("free-ports"); s.add_argument("n", type=int); s.set_defaults(fn=cmd_free_ports)
    s = sub.add_parser("policy"); s.add_argument("base"); s.set_defaults(fn=cmd_policy)
    s = sub.add_parser("seed")
    for k in ("base", "email", "password"):
        s.add_argument(f"--{k}", required=True)
    s.add_argument("--service-key", default=""); s.set_defaults(fn=cmd_seed)
    s = sub.add_parser("background"); s.add_argument("--label", default="")
    s.add_argument("--secs", type=float, default=1.0); s.add_argument("--results")
    s.add_argument("--cpu", type=int, default=0, help="where the speed probe runs")
    s.set_defaults(fn=cmd_background)
    s = sub.add_parser("idle"); s.add_argument("--pid", type=int)
    s.add_argument("--sleep", type=float, default=2.0); s.add_argument("--timeout", type=float, default=60)
    s.set_defaults(fn=cmd_idle)

    def wrk_common(s):
        s.add_argument("--scenario", required=True); s.add_argument("--request", default="")
        s.add_argument("--run", type=int, default=1); s.add_argument("--results", required=True)
        s.add_argument("--duration", default="10s"); s.add_argument("--pin", default="")
        s.add_argument("--pids", default="", help="our server pids (tessera,redis), comma-separated")
        s.add_argument("--server-cpu", type=int, default=0); s.add_argument("--load-cpu", type=int, default=1)
        s.add_argument("wrk_args", nargs=argparse.REMAINDER, help="URL [-- script args]")

    s = sub.add_parser("wrk"); wrk_common(s)
    s.add_argument("--conns", type=int, required=True); s.add_argument("--script", required=True)
    s.add_argument("--warmup", action="store_true", help="run, print req/s, record nothing")
    s.set_defaults(fn=cmd_wrk)
    s = sub.add_parser("paced"); wrk_common(s)
    s.add_argument("--peak", type=float, required=True); s.add_argument("--fraction", type=float, default=0.5)
    s.add_argument("--mean-delay-ms", type=int, default=20); s.add_argument("--runs", type=int, default=2)
    s.set_defaults(fn=cmd_paced)
    s = sub.add_parser("mem"); wrk_common(s)
    s.add_argument("--pid", type=int, required=True); s.add_argument("--conns", type=int, default=32)
    s.add_argument("--steps", default="50000,100000"); s.set_defaults(fn=cmd_mem)
    s = sub.add_parser("rss"); s.add_argument("pid", type=int); s.set_defaults(fn=cmd_rss)
    s = sub.add_parser("seconds"); s.add_argument("duration"); s.set_defaults(fn=cmd_seconds)
    s = sub.add_parser("mean-rps"); s.add_argument("--results", required=True)
    s.add_argument("--scenario", required=True); s.set_defaults(fn=cmd_mean_rps)
    s = sub.add_parser("mint"); s.add_argument("--password", required=True)
    s.add_argument("--per-user", type=int, default=80, help="below tessera's sessions-per-user cap")
    s.add_argument("--count", type=int, required=True); s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_mint)
    s = sub.add_parser("mint-users"); s.add_argument("--password", required=True)
    s.add_argument("--count", type=int, required=True); s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_mint_users)
    s = sub.add_parser("mint-totp"); s.add_argument("--password", required=True)
    s.add_argument("--count", type=int, required=True); s.add_argument("--out", required=True)
    s.add_argument("--tokens", action="store_true", help="and an mfa_token each (first step)")
    s.set_defaults(fn=cmd_mint_totp)
    s = sub.add_parser("login-mfa"); wrk_common(s)
    s.add_argument("--conns", type=int, default=4); s.add_argument("--base", required=True)
    s.add_argument("--users"); s.add_argument("--password", required=True)
    s.add_argument("--plain-email", default="", help="plain logins of this user, not --users")
    s.add_argument("--plain-users", action="store_true",
                   help="plain logins of the --users (EMAIL lines), each once")
    s.add_argument("--warmup", action="store_true", help="run, print logins/s, record nothing")
    s.set_defaults(fn=cmd_login_mfa)
    s = sub.add_parser("mailflood"); s.add_argument("--rate", type=float, default=100)
    s.add_argument("--seconds", type=float, required=True); s.set_defaults(fn=cmd_mailflood)
    s = sub.add_parser("check-tokens"); s.add_argument("--base", required=True)
    s.add_argument("--file", required=True); s.add_argument("--expect", type=int, required=True)
    s.add_argument("--n", type=int, default=3); s.add_argument("--tail", action="store_true")
    s.add_argument("--what", default="tokens"); s.add_argument("--results", required=True)
    s.set_defaults(fn=cmd_check_tokens)
    s = sub.add_parser("floor"); s.add_argument("--results", required=True)
    s.add_argument("--rounds", type=int, default=12); s.add_argument("--repeat", type=int, default=7)
    s.add_argument("--redis-port", type=int); s.set_defaults(fn=cmd_floor)
    s = sub.add_parser("mfa-step-cost"); s.add_argument("--results", required=True)
    s.add_argument("--base", required=True); s.add_argument("--tokens", required=True)
    s.add_argument("--pid", type=int, required=True); s.add_argument("--redis-pid", type=int)
    s.add_argument("--redis-port", type=int, required=True)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--monitor-steps", type=int, default=20)
    s.add_argument("--warm-steps", type=int, default=10); s.set_defaults(fn=cmd_mfa_step_cost)
    s = sub.add_parser("floor-totp"); s.add_argument("--results", required=True)
    s.add_argument("--n", type=int, default=200); s.set_defaults(fn=cmd_floor_totp)
    s = sub.add_parser("pg-reset"); s.add_argument("url"); s.set_defaults(fn=cmd_pg_reset)
    s = sub.add_parser("profile-summary"); s.add_argument("raw")
    s.add_argument("--top", type=int, default=15); s.set_defaults(fn=cmd_profile_summary)
    s = sub.add_parser("meta"); s.add_argument("--results", required=True)
    for k in ("database", "duration", "warmup", "runs"):
        s.add_argument(f"--{k}", default="?")
    s.add_argument("--server-cpu", type=int, default=0); s.add_argument("--load-cpu", type=int, default=1)
    s.add_argument("--conns", default="?"); s.set_defaults(fn=cmd_meta)
    s = sub.add_parser("report"); s.add_argument("--state", required=True)
    s.add_argument("--shared-results"); s.add_argument("--profile")
    s.add_argument("--out", required=True); s.set_defaults(fn=cmd_report)

    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
