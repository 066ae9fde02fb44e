"""Run Alembic migrations from code (used by `tessera serve`, `tessera migrate` and tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "alembic"))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(settings: Settings) -> None:
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        Path(settings.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")
