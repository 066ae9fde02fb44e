"""Settings: the one place configuration is read (environment `TESSERA_*` or `.env`)."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def normalise_database_url(url: str) -> str:
    """Give plain `sqlite://` and `postgresql://` URLs their async driver."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TESSERA_", env_file=".env", extra="ignore", frozen=True
    )

    data_dir: Path = Path("./data")
    database_url: str | None = None
    redis_url: str | None = None
    secret_key: SecretStr | None = None
    session_ttl_seconds: int = Field(604800, ge=1)
    cookie_secure: bool = True
    service_keys: Annotated[list[SecretStr], NoDecode] = []
    admin_password: SecretStr | None = None
    max_body_bytes: int = Field(65536, ge=1024)
    usage_retention_days: int = Field(90, ge=0)
    cors_origins: Annotated[list[str], NoDecode] = []

    issuer: str = "tessera"
    audience: str = "tessera"
    bcrypt_rounds: int = Field(12, ge=4, le=31)
    # Brute-force limits (failures in a sliding window, shared by all instances via Redis).
    login_max_failures_per_account: int = Field(10, ge=1)
    login_max_failures_per_ip: int = Field(50, ge=1)
    login_failure_window_seconds: int = Field(900, ge=1)
    register_max_per_ip: int = Field(20, ge=1)
    register_window_seconds: int = Field(3600, ge=1)
    # Usage log buffering: flush at this many events or this many seconds, whichever comes first.
    # Each flush is one transaction, whose fixed cost dominates at high request rates, so the
    # count is a memory cap and the timer sets the pace: often enough that one flush's work
    # (grouping and encoding ~2 us per event on the event loop) stays a short stall
    # (docs/performance.md).
    usage_flush_events: int = Field(5000, ge=1)
    usage_flush_seconds: float = Field(0.1, gt=0)
    # How long the JWKS and the current signing key are cached in-process.
    keys_cache_seconds: float = Field(30.0, ge=0)
    log_level: str = "info"
    # GET /me (bearer) and introspection on a lean path (app/fastpath.py); false sends them
    # through the full FastAPI stack, which answers alike, only slower.
    fast_path: bool = True

    # --- Mail: outbox, verification, password reset, email change (issue 13; docs/mail.md) ---
    # smtp://user:pass@host:587 (STARTTLS when offered), smtps://host:465 (implicit TLS),
    # smtp://host:port (no auth). Unset: mails are written as .eml files to <data>/outbox/.
    smtp_url: SecretStr | None = None
    mail_from: str = "tessera <no-reply@localhost>"
    mail_templates_dir: Path | None = None
    public_url: str = "http://127.0.0.1:8000"
    verify_token_ttl_seconds: int = Field(86400, ge=60)
    reset_token_ttl_seconds: int = Field(3600, ge=60)
    require_verified_email: bool = False
    # Per-address and per-IP limits on mails a stranger can make tessera send.
    mail_max_per_address: int = Field(5, ge=1)
    mail_max_per_ip: int = Field(30, ge=1)
    mail_limit_window_seconds: int = Field(3600, ge=1)
    # The outbox worker: polls this often, retries with exponential backoff (base * 2^n, at
    # most max) up to max_attempts, and a claim lasts lease seconds.
    mail_poll_seconds: float = Field(1.0, gt=0)
    mail_retry_base_seconds: float = Field(30.0, gt=0)
    mail_retry_max_seconds: float = Field(3600.0, gt=0)
    mail_max_attempts: int = Field(30, ge=1)
    mail_lease_seconds: float = Field(120.0, gt=0)
    mail_smtp_timeout_seconds: float = Field(30.0, gt=0)
    mail_retention_days: int = Field(30, ge=0)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s?#]+", value):
            raise ValueError("TESSERA_PUBLIC_URL must be an http(s) base URL")
        return value.rstrip("/")

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        if value is not None and not re.match(r"smtps?://", value.get_secret_value()):
            raise ValueError("TESSERA_SMTP_URL must start with smtp:// or smtps://")
        return value

    @field_validator("service_keys", "cors_origins", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: list[str]) -> list[str]:
        # Credentials are allowed, so a wildcard would let every site read users' data.
        for origin in value:
            if not re.fullmatch(r"https?://[^/\s*]+", origin):
                raise ValueError(f"TESSERA_CORS_ORIGINS takes exact origins "
                                 f"(scheme://host[:port]), not {origin!r}")
        return value

    @field_validator("service_keys")
    @classmethod
    def _service_keys_long_enough(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(len(key.get_secret_value()) < 32 for key in value):
            raise ValueError("each of TESSERA_SERVICE_KEYS must be at least 32 characters")
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("TESSERA_SECRET_KEY must be at least 32 characters")
        return value

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return normalise_database_url(self.database_url)
        return f"sqlite+aiosqlite:///{(self.data_dir / 'tessera.db').resolve()}"

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def session_cookie(self) -> str:
        return "__Host-session" if self.cookie_secure else "session"

    @property
    def csrf_cookie(self) -> str:
        return "__Host-csrf" if self.cookie_secure else "csrf"


VISITOR_COOKIE = "visitor"
