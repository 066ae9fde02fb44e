"""Every `tessera` command: settings that fail in one line (exit 2, never a secret's value),
a warning for a TESSERA_* variable that is no setting, the database migrated before any
command touches it, an unreachable store said in one line instead of a traceback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import PASSWORD, bearer, login, new_email, register
from tests.test_operations import cli_env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    return subprocess.run([sys.executable, "-m", "tessera.ops.cli", *args],
                          env={**clean, **env}, capture_output=True, text=True, timeout=120)


def fresh_env(tmp_path: Path) -> dict[str, str]:
    return {"TESSERA_DATA_DIR": str(tmp_path / "data"), "TESSERA_BCRYPT_ROUNDS": "4"}


def test_keys_rotate_and_purge_migrate_a_fresh_data_folder_first(tmp_path: Path) -> None:
    env = fresh_env(tmp_path)
    purged = run(env, "purge")
    assert purged.returncode == 0, purged.stderr
    assert "purged 0 usage events" in purged.stdout and "Traceback" not in purged.stderr
    rotated = run(fresh_env(tmp_path / "other"), "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "new current signing key" in rotated.stdout


def test_a_wrong_setting_is_one_line_naming_it_without_its_value(tmp_path: Path) -> None:
    secret = "short-secret-value"
    done = run({**fresh_env(tmp_path), "TESSERA_SECRET_KEY": secret,
                "TESSERA_BCRYPT_ROUNDS": "many"}, "migrate")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert any(line.startswith("tessera: TESSERA_SECRET_KEY: ") for line in lines)
    assert any(line.startswith("tessera: TESSERA_BCRYPT_ROUNDS: ") for line in lines)
    assert secret not in done.stderr and "Traceback" not in done.stderr


def test_a_variable_that_is_no_setting_is_warned_about(tmp_path: Path) -> None:
    done = run({**fresh_env(tmp_path), "TESSERA_REDIS_ULR": "redis://x"}, "migrate")
    assert done.returncode == 0, done.stderr
    assert "TESSERA_REDIS_ULR is not a tessera setting" in done.stderr


def test_an_unreachable_database_is_said_in_one_line(tmp_path: Path) -> None:
    done = run({**fresh_env(tmp_path), "TESSERA_STARTUP_WAIT_SECONDS": "1",
                "TESSERA_DATABASE_URL": "postgresql://someone:hunter22@127.0.0.1:9/none"},
               "migrate")
    assert done.returncode == 1
    assert "waiting for the database at postgresql+asyncpg://127.0.0.1:9" in done.stderr
    assert "is unreachable" in done.stderr.splitlines()[-1]
    assert "hunter22" not in done.stderr and "Traceback" not in done.stderr


async def test_a_promotion_by_the_cli_shows_in_get_me_at_once(base_settings: dict[str, Any],
                                                               client) -> None:
    user = await register(client, new_email("promoted"))
    token = (await login(client, user["email"])).json()["access_token"]
    before = await client.get("/me", headers=bearer(token))
    assert before.json()["is_admin"] is False  # cached now
    done = await asyncio.to_thread(run, {**cli_env(base_settings), "TESSERA_ADMIN_PASSWORD": PASSWORD},
               "create-admin", "--promote", user["email"])
    assert done.returncode == 0, done.stderr
    after = await client.get("/me", headers=bearer(token))
    assert after.json()["is_admin"] is True
