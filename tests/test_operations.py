"""Operator surface: health, readiness, metrics, well-known documents, CLI, secrets."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from passlib.hash import bcrypt_sha256

from tests.conftest import PASSWORD, bearer, client_for, login, new_email, register, running_app


def cli(env: dict[str, str], *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tessera.ops.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, input=input)


def cli_env(base_settings: dict[str, Any]) -> dict[str, str]:
    return {"TESSERA_DATABASE_URL": str(base_settings["database_url"]),
            "TESSERA_REDIS_URL": str(base_settings["redis_url"]),
            "TESSERA_DATA_DIR": str(base_settings["data_dir"]),
            "TESSERA_BCRYPT_ROUNDS": "4"}


async def test_health_and_readiness(client) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


async def test_metrics_count_requests_by_route_and_logins_by_outcome(client) -> None:
    user = await register(client)
    await login(client, user["email"])
    await login(client, user["email"], "wrong password!")
    await client.get(f"/admin/users/{user['id']}/minor")  # a path with an id in it
    text = (await client.get("/metrics")).text
    assert 'tessera_logins_total{outcome="ok"}' in text
    assert 'tessera_logins_total{outcome="failed"}' in text
    assert "tessera_sessions_issued_total" in text
    assert 'route="/auth/login"' in text
    assert user["id"] not in text  # route templates, never raw paths


async def test_well_known_documents(client) -> None:
    dnt = await client.get("/.well-known/dnt/")
    assert dnt.headers["content-type"].startswith("application/tracking-status+json")
    assert dnt.json() == {"tracking": "?"}
    policy = (await client.get("/policy")).json()
    assert set(policy) == {"version", "last_updated", "substantial"}
    gpc = (await client.get("/.well-known/gpc.json")).json()
    assert gpc["gpc"] is True and gpc["lastUpdate"] == policy["last_updated"][:10]
    jwks = await client.get("/.well-known/jwks.json")
    key = jwks.json()["keys"][0]
    assert {k: key[k] for k in ("kty", "crv", "alg", "use")} == \
        {"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig"}
    assert "d" not in key  # never the private half
    assert "max-age" in jwks.headers["cache-control"]
    again = await client.get("/.well-known/jwks.json",
                             headers={"If-None-Match": jwks.headers["etag"]})
    assert again.status_code == 304


def test_generated_secret_is_private_and_reused(tmp_path: Path) -> None:
    from tessera.config import Settings
    from tessera.security.secret import load_or_create_secret

    settings = Settings(data_dir=tmp_path)
    first = load_or_create_secret(settings)
    mode = stat.S_IMODE((tmp_path / "secret.key").stat().st_mode)
    assert mode == 0o600
    assert len(first) >= 32
    assert load_or_create_secret(settings) == first


async def test_private_keys_in_the_database_are_ciphertext(app) -> None:
    from cryptography.hazmat.primitives import serialization
    from sqlmodel import select

    from tessera.stores.models import SigningKey

    t = app.state.tessera
    async with t.db_factory() as db:
        rows = list((await db.exec(select(SigningKey))).all())
    assert rows
    current = t.keys.current
    raw = current.private.private_bytes(serialization.Encoding.Raw,
                                        serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())
    from tessera.stores.keys import b64url

    for row in rows:
        assert b64url(raw) not in row.private_enc and raw.hex() not in row.private_enc


def test_cli_create_admin_then_promote(base_settings: dict[str, Any]) -> None:
    env = cli_env(base_settings)
    email = new_email("admin")
    created = cli({**env, "TESSERA_ADMIN_PASSWORD": PASSWORD}, "create-admin", email)
    assert created.returncode == 0, created.stderr
    assert "created admin" in created.stdout
    again = cli(env, "create-admin", email.upper(), "--promote")
    assert again.returncode == 0 and "promoted" in again.stdout


async def test_cli_create_admin_promotes_an_existing_account_only_when_told(
        base_settings: dict[str, Any], client) -> None:
    """Issue 12.2: an account someone registered is not silently made admin: without
    --promote only the account's own password promotes it (shared/API.md: "promotes an
    existing user, keeping their password"); --promote says which account (id, email,
    created_at) it promoted."""
    env = {**cli_env(base_settings), "TESSERA_ADMIN_PASSWORD": "the operator's own pass 42"}
    user = await register(client)  # someone else's account, with their password
    refused = await asyncio.to_thread(cli, env, "create-admin", user["email"])
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--promote" in lines[0], refused.stderr
    assert "the operator's" not in refused.stderr  # never the secret's value
    token = (await login(client, user["email"])).json()["access_token"]
    assert (await client.get("/admin/users", headers=bearer(token))).status_code == 403

    own = await register(client)  # the operator's account: its password promotes it
    mine = await asyncio.to_thread(cli, {**env, "TESSERA_ADMIN_PASSWORD": PASSWORD},
                                   "create-admin", own["email"])
    assert mine.returncode == 0, mine.stderr
    assert "promoted" in mine.stdout and own["id"] in mine.stdout
    own_token = (await login(client, own["email"])).json()["access_token"]
    me = (await client.get("/me", headers=bearer(own_token))).json()
    assert me["is_admin"] is True

    promoted = await asyncio.to_thread(cli, env, "create-admin", user["email"], "--promote")
    assert promoted.returncode == 0, promoted.stderr
    assert user["id"] in promoted.stdout and user["email"] in promoted.stdout
    assert user["created_at"][:19] in promoted.stdout.replace(" ", "T")
    assert (await client.get("/admin/users", headers=bearer(token))).status_code == 200

    # A look-alike (long s) is another account: create-admin creates a new admin, it does
    # not promote the look-alike.
    local, domain = new_email("sam").split("@")
    lookalike = await register(client, local.replace("s", "\u017f", 1) + "@" + domain)
    created = await asyncio.to_thread(cli, env, "create-admin", f"{local}@{domain}")
    assert created.returncode == 0, created.stderr
    assert "created admin" in created.stdout and lookalike["id"] not in created.stdout
    lookalike_token = (await login(client, lookalike["email"])).json()["access_token"]
    assert (await client.get("/admin/users",
                             headers=bearer(lookalike_token))).status_code == 403


def test_cli_migrate_and_purge(base_settings: dict[str, Any]) -> None:
    env = cli_env(base_settings)
    assert cli(env, "migrate").returncode == 0
    purged = cli({**env, "TESSERA_USAGE_RETENTION_DAYS": "90"}, "purge")
    assert purged.returncode == 0, purged.stderr
    assert "purged" in purged.stdout


async def test_admin_created_by_cli_can_use_the_admin_api(base_settings: dict[str, Any],
                                                           client) -> None:
    email = new_email("admin")
    done = await asyncio.to_thread(cli, {**cli_env(base_settings), "TESSERA_ADMIN_PASSWORD": PASSWORD}, "create-admin",
               email)
    assert done.returncode == 0, done.stderr
    token = (await login(client, email)).json()["access_token"]
    # No policy acceptance is inferred, the admin's neither: it accepts first (P10).
    gated = await client.get("/admin/users", headers=bearer(token))
    assert gated.status_code == 403 and gated.json()["code"] == "policy_consent_required"
    version = (await client.get("/policy")).json()["version"]
    assert (await client.post("/me/policy-consent", json={"version": version},
                              headers=bearer(token))).status_code == 204
    found = await client.get("/admin/users", params={"email": email}, headers=bearer(token))
    assert found.status_code == 200 and found.json()[0]["is_admin"] is True


async def test_login_rehashes_when_the_cost_setting_changes(base_settings: dict[str, Any]) -> None:
    from sqlmodel import select

    from tessera.stores.models import User

    async with running_app(**base_settings) as cheap:
        async with client_for(cheap) as client:
            user = await register(client)
    async with running_app(**{**base_settings, "bcrypt_rounds": 5}) as costlier:
        async with client_for(costlier) as client:
            assert (await login(client, user["email"])).status_code == 200
        async with costlier.state.tessera.db_factory() as db:
            row = (await db.exec(select(User).where(User.id == user["id"]))).one()
    assert bcrypt_sha256.from_string(row.password_hash).rounds == 5


def test_default_cost_is_12_and_hashes_are_bcrypt_sha256() -> None:
    from tessera.config import Settings
    from tessera.security.passwords import PasswordHasher

    assert Settings().bcrypt_rounds == 12
    hasher = PasswordHasher(12)
    assert hasher._dummy_hash.startswith("$bcrypt-sha256$") and ",r=12$" in hasher._dummy_hash


async def test_openapi_authorize_button_uses_the_password_flow(client) -> None:
    schema = (await client.get("/openapi.json")).json()
    scheme = schema["components"]["securitySchemes"]["OAuth2PasswordBearer"]
    assert scheme["flows"]["password"]["tokenUrl"] == "/auth/login"
    secured = {(path, method) for path, ops in schema["paths"].items()
               for method, op in ops.items() if op.get("security")}
    assert {("/me", "get"), ("/auth/sessions", "get"), ("/admin/users", "get")} <= secured
    assert ("/auth/login", "post") not in secured and ("/policy", "get") not in secured


async def test_password_hashing_runs_in_lower_priority_threads() -> None:
    import os
    import sys
    import threading

    from tessera.security.passwords import HASH_THREAD_NICE, PasswordHasher

    hasher = PasswordHasher(4)
    try:
        seen = await hasher._run(lambda: (threading.current_thread().name,
                                          os.getpriority(os.PRIO_PROCESS,
                                                         threading.get_native_id())))
        assert seen[0].startswith("tessera-hash")
        if sys.platform == "linux":  # per-thread nice values are Linux's
            assert seen[1] == os.getpriority(os.PRIO_PROCESS, 0) + HASH_THREAD_NICE \
                or seen[1] == 19
        ok, _ = await hasher.verify("a password!", hasher._context.hash("a password!"))
        assert ok
    finally:
        hasher.close()
