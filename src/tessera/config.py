"""Settings: the one place configuration is read (environment `TESSERA_*` or `.env`)."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
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
    # How long a command waits at start for an unreachable database or Redis (saying so in
    # one line) before it gives up with exit code 1.
    startup_wait_seconds: float = Field(30.0, ge=0)

    # --- Second factors (issue 14: TOTP, recovery codes, passkeys) ---
    mfa_issuer: str = Field("tessera", min_length=1, max_length=64)
    # The second login step: the mfa_token's life, wrong codes per token and per account
    # (the account's window is login_failure_window_seconds).
    # At most an hour: well inside the auth epoch's life (a day), which the token relies on.
    mfa_token_ttl_seconds: int = Field(300, ge=30, le=3600)
    mfa_max_failures_per_token: int = Field(5, ge=1)
    mfa_max_failures_per_account: int = Field(10, ge=1)
    # Base URL of the pages (shared with mail links: one setting, TESSERA_PUBLIC_URL).
    public_url: str = "http://127.0.0.1:8000"
    webauthn_rp_id: str | None = None  # default: the host of public_url
    webauthn_origins: Annotated[list[str], NoDecode] = []  # default: public_url's origin
    webauthn_rp_name: str = Field("tessera", min_length=1, max_length=64)
    webauthn_challenge_ttl_seconds: int = Field(300, ge=10, le=3600)
    # A session whose login is at most this old may add a passkey without sending the
    # password again (it was sent at that login, with the second factor if one is enrolled);
    # an older session must send `current_password` (docs/mfa.md). 0: always ask.
    reauth_seconds: int = Field(300, ge=0, le=3600)

    @field_validator("webauthn_origins", mode="before")
    @classmethod
    def _webauthn_csv(cls, value: object) -> object:
        return _split_csv(value)

    # Events to the services around tessera: webhooks, the mailing vendor (P8), forward auth
    # (issue 15; docs/events.md).
    # Hosts a webhook or the vendor URL may name although they resolve to a loopback or
    # private address (plain http is allowed for them only).
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = []
    mailing_vendor_url: str | None = None
    mailing_vendor_secret: SecretStr | None = None
    # Whether this instance runs the delivery worker (any number of instances may).
    events_worker: bool = True
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=60)
    webhook_poll_seconds: float = Field(1.0, gt=0)
    webhook_batch: int = Field(20, ge=1, le=500)
    # A delivery claimed by an instance is its own for this long (longer than a timeout);
    # an instance that dies mid-delivery leaves it to be sent again after that.
    webhook_lease_seconds: float = Field(60.0, gt=0)
    webhook_backoff_base_seconds: float = Field(5.0, gt=0)
    webhook_backoff_max_seconds: float = Field(14400.0, gt=0)
    # A failing delivery is retried for this long (at least 24 h), then marked failed.
    webhook_retry_seconds: int = Field(93600, ge=86400)
    # Peers whose X-Forwarded-* headers are trusted ("*" for any), for GET /auth/check and,
    # with TESSERA_PROXY_HEADERS, for the client address of every request.
    forwarded_allow_ips: Annotated[list[str], NoDecode] = ["127.0.0.1"]
    proxy_headers: bool = False

    @field_validator("webhook_allowed_hosts", "forwarded_allow_ips", mode="before")
    @classmethod
    def _csv_events(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _vendor_url_guarded(self) -> Settings:
        if self.mailing_vendor_url:
            from urllib.parse import urlsplit

            parts = urlsplit(self.mailing_vendor_url)
            allowed = {h.lower() for h in self.webhook_allowed_hosts}
            if not parts.hostname or parts.scheme not in ("https", "http") or (
                    parts.scheme == "http" and parts.hostname.lower() not in allowed):
                raise ValueError("TESSERA_MAILING_VENDOR_URL must be https:// (plain http "
                                 "only for a host in TESSERA_WEBHOOK_ALLOWED_HOSTS)")
            if self.mailing_vendor_secret is None:
                raise ValueError("TESSERA_MAILING_VENDOR_SECRET is needed with "
                                 "TESSERA_MAILING_VENDOR_URL")
        return self

    # --- Durability and HTTP limits (issue 12: faults, crashes, slow or huge headers) ---
    # The request line and headers at the HTTP layer (`tessera serve`, before the app):
    # past this size a 431, past this time from the connection (or from a next request's
    # first byte) a 408; then the connection is closed (ops/http.py).
    http_max_head_bytes: int = Field(65536, ge=4096)
    http_head_timeout_seconds: float = Field(10.0, gt=0)
    # Idle kept-alive connections close after this long.
    http_keep_alive_seconds: int = Field(5, ge=1)
    # Connections plus requests in flight per worker past which uvicorn answers 503.
    http_max_connections: int = Field(4096, ge=16)
    # Redis must keep a logout across its own crash: `require` (the default) refuses to start
    # (and /readyz reports not ready) on a Redis without an fsynced append-only file;
    # `trusted` skips the check (a managed Redis that refuses CONFIG but persists writes);
    # `off` accepts a Redis that may forget logouts (development only).
    redis_durability: Literal["require", "trusted", "off"] = "require"
    # PostgreSQL: connecting, and each statement, give up after this long (a partition
    # answers 503 within seconds instead of hanging for its whole length).
    db_connect_timeout_seconds: float = Field(5.0, gt=0)
    db_statement_timeout_seconds: float = Field(10.0, gt=0)

    # --- Issue 12 (security): bounded password work and PATCH /me throttling -------------
    # Every bcrypt verify (login, password change, DELETE /me) counts, whatever its outcome,
    # per account and per client IP (IPv6 by /64) in a 60 s window; past the max: 429.
    password_work_max_per_account_minute: int = Field(30, ge=1)
    password_work_max_per_ip_minute: int = Field(300, ge=1)
    # At most this many hashes of one account at a time per process; more wait their turn
    # without holding a hashing thread, so one account's flood leaves the pool to others.
    password_work_concurrency_per_account: int = Field(2, ge=1)
    # PATCH /me (its 409 email_taken tells whether an address has an account), per user.
    email_change_max_per_user: int = Field(10, ge=1)
    email_change_window_seconds: int = Field(3600, ge=1)

    # --- Mail: outbox, verification, password reset, email change (issue 13; docs/mail.md) ---
    # smtp://user:pass@host:587 (STARTTLS when offered), smtps://host:465 (implicit TLS),
    # smtp://host:port (no auth). Unset: mails are written as .eml files to <data>/outbox/.
    smtp_url: SecretStr | None = None
    mail_from: str = "tessera <no-reply@localhost>"
    mail_templates_dir: Path | None = None
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
    # While the process is saturated (its CPU time >= 85 % of wall time over the last half
    # second: a request flood), the outbox worker rests after each pass so that it takes at
    # most this share of the time: requests keep the CPU and a backlog drains when the flood
    # ends (docs/mail.md). 1: no limit.
    mail_busy_share: float = Field(0.03, gt=0, le=1)
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

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from urllib.parse import urlsplit

        from sqlalchemy.engine import make_url

        try:
            urlsplit(value).port  # noqa: B018 (raises on a malformed host or port)
            make_url(normalise_database_url(value))
        except Exception:  # never echo the value: it may hold a password
            raise ValueError("not a database URL (sqlite:///path or "
                             "postgresql://user@host/db)") from None
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
