"""Run Alembic migrations from code (used by `tessera serve`, `tessera migrate` and tests).

The migrations are package data (`tessera/ops/migrations/`), so an installed wheel migrates.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from tessera.config import Settings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(settings: Settings) -> None:
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        Path(settings.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(sync_connection: object) -> str | None:
    """The revision a database is at (None for an empty one), from a sync connection."""
    return MigrationContext.configure(sync_connection).get_current_revision()  # type: ignore[arg-type]
