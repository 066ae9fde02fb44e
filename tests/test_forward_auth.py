"""GET /auth/check (API.md "Reverse proxies"): forward auth, in-process and behind a real
nginx (Debian's package) in front of a small upstream."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tessera.stores.usage import usage_log_of
from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    client_for,
    login,
    register,
    registered_token,
)
from tests.receivers import Receiver
from tests.servers import LOOPBACK, _stop, free_port


async def usage_of(app: FastAPI, user_id: str) -> list[dict[str, Any]]:
    t = app.state.tessera
    await t.usage.flush()
    async with t.db_factory() as db:
        return await usage_log_of(db, user_id)


FORWARDED = {"X-Forwarded-Method": "POST", "X-Forwarded-Host": "app.example.com",
             "X-Forwarded-Uri": "/orders/42?coupon=secret", "X-Forwarded-For": "198.51.100.7"}


async def test_check_answers_identity_headers_for_a_valid_token_and_401_otherwise(
        app: FastAPI, client: Any) -> None:
    user, token = await registered_token(client)
    client.cookies.clear()  # the bearer token only
    ok = await client.get("/auth/check", headers=bearer(token))
    assert ok.status_code == 200 and ok.content == b""
    assert ok.headers["x-auth-user-id"] == user["id"]
    assert ok.headers["x-auth-session-id"] and ok.headers["cache-control"] == "no-store"
    assert ok.headers["x-auth-amr"] == "pwd"  # a password login

    assert_problem(await client.get("/auth/check"), 401, "not_authenticated")
    bad = await client.get("/auth/check", headers=bearer(token[:-4] + "AAAA"))
    assert_problem(bad, 401, "not_authenticated")
    assert bad.headers["www-authenticate"] == "Bearer"
    assert_problem(await client.get("/auth/check", headers={"Authorization": "Basic eDp5"}),
                   401, "not_authenticated")
    assert (await client.post("/auth/logout", headers=bearer(token))).status_code == 204
    assert_problem(await client.get("/auth/check", headers=bearer(token)), 401,
                   "not_authenticated")


async def test_check_takes_the_session_cookie(app: FastAPI) -> None:
    async with client_for(app) as browser:
        user = await register(browser)
        assert (await login(browser, user["email"])).status_code == 200
        ok = await browser.get("/auth/check")  # the session cookie, no CSRF on a GET
        assert ok.status_code == 200 and ok.headers["x-auth-user-id"] == user["id"]


async def test_the_usage_log_records_the_original_request_from_a_trusted_proxy_only(
        app: FastAPI, client: Any) -> None:
    user, token = await registered_token(client)
    before = len(await usage_of(app, user["id"]))
    assert (await client.get("/auth/check", headers={**bearer(token), **FORWARDED})
            ).status_code == 200
    events = (await usage_of(app, user["id"]))[before:]
    assert [(e["method"], e["path"], e["host"], e["ip"]) for e in events] == [
        ("POST", "/orders/42", "app.example.com", "198.51.100.7")]  # once, no query string

    # From a peer that is not a trusted proxy the headers are ignored: the check itself.
    async with client_for(app, ip="203.0.113.9") as stranger:
        assert (await stranger.get("/auth/check", headers={**bearer(token), **FORWARDED})
                ).status_code == 200
    events = (await usage_of(app, user["id"]))[before + 1:]
    assert [(e["method"], e["path"], e["host"], e["ip"]) for e in events] == [
        ("GET", "/auth/check", "testserver", "203.0.113.9")]


async def test_envoy_asks_with_the_original_method_and_path_after_its_prefix(
        app: FastAPI, client: Any) -> None:
    user, token = await registered_token(client)
    client.cookies.clear()
    before = len(await usage_of(app, user["id"]))
    ok = await client.delete("/auth/check/orders/42", headers={**bearer(token),
                                                              "Host": "shop.example.com"})
    assert ok.status_code == 200 and ok.headers["x-auth-user-id"] == user["id"]
    events = (await usage_of(app, user["id"]))[before:]
    assert [(e["method"], e["path"], e["host"]) for e in events] == [
        ("DELETE", "/orders/42", "shop.example.com")]
    assert_problem(await client.post("/auth/check/orders/42"), 401, "not_authenticated")


@pytest.mark.parametrize("opt_out", [{"DNT": "1"}, {"Sec-GPC": "1"}])
async def test_the_original_requests_dnt_gpc_and_the_users_restriction_are_honoured(
        app: FastAPI, client: Any, opt_out: dict[str, str]) -> None:
    user, token = await registered_token(client)
    before = len(await usage_of(app, user["id"]))
    answer = await client.get("/auth/check", headers={**bearer(token), **FORWARDED, **opt_out})
    assert answer.status_code == 200 and answer.headers["tk"] == "N"
    assert len(await usage_of(app, user["id"])) == before

    assert (await client.put("/me/restrictions", headers=bearer(token), json={
        "restrict_processing": True, "object_to_processing": False})).status_code == 200
    before = len(await usage_of(app, user["id"]))
    answer = await client.get("/auth/check", headers={**bearer(token), **FORWARDED})
    assert answer.status_code == 200 and answer.headers["tk"] == "N"
    assert len(await usage_of(app, user["id"])) == before


async def test_an_inactive_or_deleted_account_fails_the_check(app: FastAPI, client: Any) -> None:
    user, token = await registered_token(client)
    client.cookies.clear()
    assert (await client.request("DELETE", "/me", json={"password": PASSWORD},
                                 headers=bearer(token))).status_code == 204
    assert_problem(await client.get("/auth/check", headers=bearer(token)), 401,
                   "not_authenticated")


# --- behind a real nginx -------------------------------------------------------------------

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {host}:{port};
        location / {{
            auth_request /_tessera_check;
            auth_request_set $auth_user_id $upstream_http_x_auth_user_id;
            proxy_set_header X-Auth-User-Id $auth_user_id;
            proxy_pass http://{host}:{upstream};
        }}
        location = /_tessera_check {{
            internal;
            proxy_pass http://{host}:{tessera}/auth/check;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Forwarded-Method $request_method;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def nginx(server: Any, upstream: Receiver, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[str]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (Debian package nginx)")
    workdir = tmp_path_factory.mktemp("nginx")
    port = free_port()
    tessera_port = int(server.url.rsplit(":", 1)[1])
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, host=LOOPBACK, port=port,
                                      upstream=upstream.port, tessera=tessera_port))
    proc = subprocess.Popen([NGINX, "-p", str(workdir), "-c", str(conf), "-e",
                             str(workdir / "error.log")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {proc.stderr.read() if proc.stderr else ''!r}")
        try:
            httpx.get(url + "/", timeout=1)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield url
    _stop(proc, 10)


async def test_nginx_lets_a_valid_token_through_and_refuses_logged_out_and_missing_ones(
        app: FastAPI, nginx: str, upstream: Receiver, http: httpx.AsyncClient) -> None:
    user, token = await registered_token(http)
    async with httpx.AsyncClient(base_url=nginx, timeout=10) as proxy:
        passed = await proxy.get("/app/page?x=1", headers=bearer(token))
        assert passed.status_code == 200, passed.text
        assert passed.json() == {"path": "/app/page?x=1", "user": user["id"]}

        before = len(upstream.received)
        assert (await proxy.get("/app/page")).status_code == 401
        assert (await proxy.get("/app/page", headers=bearer("not-a-token"))).status_code == 401
        assert (await http.post("/auth/logout", headers=bearer(token))).status_code == 204
        assert (await proxy.get("/app/page", headers=bearer(token))).status_code == 401
        assert len(upstream.received) == before  # nothing refused reached the upstream

    # The tessera process logged the original call (nginx is on loopback, a trusted proxy).
    deadline = time.monotonic() + 10
    while True:
        events = await usage_of(app, user["id"])
        if any(e["path"] == "/app/page" for e in events) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    original = [e for e in events if e["path"] == "/app/page"]
    assert original and original[0]["host"] == LOOPBACK and original[0]["method"] == "GET"
    assert not any(e["path"] == "/auth/check" for e in events)


# --- behind a real Caddy (Debian's package) ------------------------------------------------

CADDY = shutil.which("caddy") or "/usr/bin/caddy"

CADDYFILE = """
{{
    admin off
    auto_https off
}}
http://{host}:{port} {{
    forward_auth {host}:{tessera} {{
        uri /auth/check
        copy_headers X-Auth-User-Id X-Auth-Session-Id
    }}
    reverse_proxy {host}:{upstream}
}}
"""


@pytest.fixture(scope="module")
def caddy(server: Any, upstream: Receiver, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[str]:
    if not Path(CADDY).exists():
        pytest.skip("caddy is not installed (Debian package caddy)")
    workdir = tmp_path_factory.mktemp("caddy")
    port = free_port()
    conf = workdir / "Caddyfile"
    conf.write_text(CADDYFILE.format(host=LOOPBACK, port=port, upstream=upstream.port,
                                     tessera=int(server.url.rsplit(":", 1)[1])))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir),
           "XDG_DATA_HOME": str(workdir / "data"), "XDG_CONFIG_HOME": str(workdir / "config")}
    log = open(workdir / "caddy.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([CADDY, "run", "--config", str(conf), "--adapter", "caddyfile"],
                            env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + 20
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"caddy exited: {(workdir / 'caddy.log').read_text()}")
            try:
                httpx.get(url + "/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        _stop(proc, 10)
        log.close()


async def test_caddy_forward_auth_lets_a_valid_token_through_and_refuses_the_rest(
        app: FastAPI, caddy: str, upstream: Receiver, http: httpx.AsyncClient) -> None:
    user, token = await registered_token(http)
    async with httpx.AsyncClient(base_url=caddy, timeout=10) as proxy:
        passed = await proxy.get("/shop/cart", headers=bearer(token))
        assert passed.status_code == 200, passed.text
        assert passed.json() == {"path": "/shop/cart", "user": user["id"]}
        before = len(upstream.received)
        assert (await proxy.get("/shop/cart")).status_code == 401
        assert (await http.post("/auth/logout", headers=bearer(token))).status_code == 204
        assert (await proxy.get("/shop/cart", headers=bearer(token))).status_code == 401
        assert len(upstream.received) == before
    deadline = time.monotonic() + 10
    while True:
        events = await usage_of(app, user["id"])
        if any(e["path"] == "/shop/cart" for e in events) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert [e["method"] for e in events if e["path"] == "/shop/cart"] == ["GET"]


# --- the deployment's nginx (deploy/nginx.conf, docker-compose.yml) ------------------------

DEPLOY_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"


@pytest.fixture(scope="module")
def deploy_nginx(server: Any, upstream: Receiver, tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[str]:
    """deploy/nginx.conf as shipped, its service names pointed at the test's processes."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (Debian package nginx)")
    workdir = tmp_path_factory.mktemp("deploy-nginx")
    port = free_port()
    conf = DEPLOY_CONF.read_text()
    for old, new in (("server tessera:8000;", f"server {server.url.split('//', 1)[1]};"),
                     ("server app:80;", f"server {LOOPBACK}:{upstream.port};"),
                     ("listen 8080;", f"listen {LOOPBACK}:{port};")):
        assert old in conf
        conf = conf.replace(old, new)
    temp = "".join(f"    {name}_temp_path {workdir}/{name};\n"
                   for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = conf.replace("http {\n", "http {\n" + temp, 1)
    (workdir / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
                             "-e", str(workdir / "error.log"), "-g",
                             f"daemon off; pid {workdir}/nginx.pid;"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {proc.stderr.read() if proc.stderr else ''!r}")
        try:
            httpx.get(url + "/healthz", timeout=1)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield url
    _stop(proc, 10)


async def test_the_deployment_nginx_logs_in_through_tessera_and_guards_the_upstream(
        deploy_nginx: str, upstream: Receiver) -> None:
    async with httpx.AsyncClient(base_url=deploy_nginx, timeout=10) as browser:
        assert (await browser.get("/")).status_code == 401
        user = await register(browser)
        assert (await login(browser, user["email"])).status_code == 200  # via nginx
        passed = await browser.get("/orders")  # the session cookie
        assert passed.status_code == 200
        assert passed.json() == {"path": "/orders", "user": user["id"]}
        assert (await browser.get("/docs")).status_code == 200  # tessera's own, not guarded
