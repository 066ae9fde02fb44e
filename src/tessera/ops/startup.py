"""What every `tessera` command does before its work: settings that fail as a person needs
(one line naming the setting, exit code 2, never a secret's value), a warning for a
`TESSERA_*` variable that is no setting, and stores that are waited for with one line each
instead of a traceback."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

from pydantic import ValidationError

from tessera.config import Settings

T = TypeVar("T")

# Read by the test suite and the bench, never by the service.
_NOT_SETTINGS_PREFIXES = ("TESSERA_TEST_", "TESSERA_BENCH_")


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"tessera: {message}", file=sys.stderr)
    raise SystemExit(code)


def load_settings() -> Settings:
    """Settings, or one line per wrong setting and exit code 2."""
    try:
        settings = Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            name = f"TESSERA_{field.upper()}" if field else "settings"
            # The message only: pydantic's `input` may hold a secret's value.
            lines.append(f"tessera: {name}: {error['msg']}")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
    for name in unknown_variables(os.environ):
        print(f"tessera: warning: {name} is not a tessera setting (a typo?); it is ignored",
              file=sys.stderr)
    return settings


def unknown_variables(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    known = {f"TESSERA_{name.upper()}" for name in Settings.model_fields}
    return sorted(name for name in environ
                  if name.upper().startswith("TESSERA_") and name.upper() not in known
                  and not name.upper().startswith(_NOT_SETTINGS_PREFIXES))


def where(url: str) -> str:
    """A store's address for messages: scheme, host and port, never credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a malformed URL: its scheme, never the rest (credentials)
        return url.split(":", 1)[0] + "://(malformed)"
    if parts.scheme.startswith("sqlite"):
        return url.split("?", 1)[0]
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(port) if port else ''}"


def with_retries(what: str, attempt: Callable[[], T], *, wait_seconds: float) -> T:
    """`attempt()` until it works, saying in one line what is wrong; gives up (exit 1) after
    `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    said = ""
    while True:
        try:
            return attempt()
        except (OSError, ConnectionError, TimeoutError) as exc:
            reason = _reason(exc)
        except Exception as exc:  # driver errors wrap the OSError
            if not _is_connection_error(exc):
                raise
            reason = _reason(exc)
        if time.monotonic() >= deadline:
            fail(f"{what} is unreachable ({reason}); giving up", 1)
        if reason != said:
            print(f"tessera: waiting for {what} ({reason})", file=sys.stderr)
            said = reason
        time.sleep(1)


def _is_connection_error(exc: BaseException) -> bool:
    import redis.exceptions
    import sqlalchemy.exc

    return isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc.__cause__ or exc
    text = str(inner).splitlines()[0] if str(inner) else type(inner).__name__
    return text[:160]


def wait_for_redis(url: str, wait_seconds: float) -> None:
    import redis.asyncio

    async def ping() -> None:
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            await client.ping()
        finally:
            await client.aclose()

    with_retries(f"Redis at {where(url)}", lambda: asyncio.run(ping()),
                 wait_seconds=wait_seconds)
