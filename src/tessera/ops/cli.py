"""The `tessera` command line: serve, migrate, create-admin, keys rotate, purge."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.config import Settings
from tessera.ops.startup import load_settings, wait_for_redis, with_retries

T = TypeVar("T")

cli = typer.Typer(help="tessera: auth and sessions that enforce a privacy policy.",
                  no_args_is_help=True, add_completion=False)
keys_cli = typer.Typer(help="Signing keys.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
mail_cli = typer.Typer(help="Transactional mail.", no_args_is_help=True)
cli.add_typer(mail_cli, name="mail")


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    proxy_headers: Annotated[bool | None, typer.Option(
        "--proxy-headers/--no-proxy-headers",
        help="Take the client address from X-Forwarded-For of a trusted proxy "
             "(default: TESSERA_PROXY_HEADERS).")] = None,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        help="Comma-separated trusted proxy addresses or networks, * for any "
             "(default: TESSERA_FORWARDED_ALLOW_IPS, 127.0.0.1).")] = None,
) -> None:
    """Apply pending migrations, then serve (uvloop, httptools, no access log, no
    WebSocket)."""
    import uvicorn

    from tessera.ops.embedded import EmbeddedRedis
    from tessera.ops.logs import configure_logging

    # Handed to the app (and every worker) as settings: tessera applies the proxy headers
    # itself (edge/proxy.py), so GET /auth/check still knows the direct peer.
    if proxy_headers is not None:
        os.environ["TESSERA_PROXY_HEADERS"] = "true" if proxy_headers else "false"
    if forwarded_allow_ips is not None:
        os.environ["TESSERA_FORWARDED_ALLOW_IPS"] = forwarded_allow_ips
    settings = load_settings()
    configure_logging(settings.log_level)
    if settings.redis_url:
        wait_for_redis(settings.redis_url, settings.startup_wait_seconds)
    _migrate(settings)
    embedded = None
    if settings.embedded_redis:
        # Started once here, so every worker shares one embedded Redis.
        embedded = EmbeddedRedis(settings.data_dir)
        os.environ["TESSERA_REDIS_URL"] = embedded.start(supervise=True)
    if settings.redis_durability == "require":
        _require_durable_redis(os.environ["TESSERA_REDIS_URL"], embedded)
    # uvicorn re-raises SIGTERM after its graceful shutdown; exit through Python instead, so
    # the `finally` below stops the embedded redis-server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if workers > 1:  # the workers die with this supervisor, even on a kill -9 (ops/lifeline.py)
        from tessera.ops.lifeline import SUPERVISOR_PID_ENV

        os.environ[SUPERVISOR_PID_ENV] = str(os.getpid())
    try:
        # httptools with a bound on the request head's size and time (ops/http.py).
        uvicorn.run("tessera.main:create_app", factory=True, host=host, port=port, workers=workers,
                    loop="uvloop", http="tessera.ops.http:BoundedHttpToolsProtocol",
                    # Nothing in tessera speaks WebSocket: an upgrade attempt is plain HTTP
                    # (refused by the app like any request), and uvicorn's WebSocket
                    # protocol, which logs the client's address and path, never runs.
                    ws="none",
                    access_log=False, log_config=None, proxy_headers=False,
                    timeout_keep_alive=settings.http_keep_alive_seconds,
                    limit_concurrency=settings.http_max_connections,
                    timeout_graceful_shutdown=20, server_header=False)
    finally:
        if embedded is not None:
            embedded.stop()


def _require_durable_redis(url: str, embedded: object) -> None:
    """One clear line and exit code 2 on a Redis that would forget logouts."""
    import redis.exceptions

    from tessera.stores.durability import durability_problem_sync

    try:
        problem = durability_problem_sync(url)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        return  # down now: the server starts, answers 503, and /readyz checks again
    if problem:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]
        typer.echo(f"tessera: refusing to start: {problem}", err=True)
        raise typer.Exit(2)


@cli.command()
def migrate() -> None:
    """Upgrade the configured database to the newest schema (alembic upgrade head)."""
    _migrate(load_settings())
    typer.echo("database is at the newest schema")


def _migrate(settings: Settings) -> None:
    """Every command that touches the database brings it to the newest schema first,
    waiting (one line per reason) for a database that is not reachable yet."""
    from tessera.ops import migrate as migrations
    from tessera.ops.startup import where

    with_retries(f"the database at {where(settings.resolved_database_url)}",
                 lambda: migrations.upgrade(settings), wait_seconds=settings.startup_wait_seconds)


def _with_db(fn: Callable[[Settings, AsyncSession], Awaitable[T]]) -> T:
    """Settings checked, the database migrated (or waited for), then `fn` with a `db`."""
    from tessera.stores.db import create_engine, session_factory

    settings = load_settings()
    _migrate(settings)

    async def run() -> T:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with session_factory(engine)() as db:
                return await fn(settings, db)
        finally:
            await engine.dispose()

    return asyncio.run(run())


async def _forget_cached_profile(settings: Settings, user_id: str) -> None:
    """A change made here must reach `GET /me` at once, as a change through the API does."""
    from tessera.domain.profiles import ProfileCache
    from tessera.ops.embedded import EmbeddedRedis
    from tessera.stores.redis import create_redis

    embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir)
    url = settings.redis_url or embedded.start()  # type: ignore[union-attr]
    redis = create_redis(url)
    try:
        await ProfileCache(redis).invalidate(user_id)
    finally:
        await redis.aclose()
        if embedded is not None:
            embedded.stop()  # only if this command started it


@cli.command("create-admin")
def create_admin(
    email: str,
    promote: Annotated[bool, typer.Option(
        "--promote", help="Make the existing account with this email an admin (it keeps its "
        "password), instead of creating one.")] = False,
) -> None:
    """Create an admin (password from TESSERA_ADMIN_PASSWORD or a prompt), or promote the
    existing account with this email, keeping its password: without --promote only when the
    password given is that account's (it may be someone else's account: registration is
    open), with --promote always. Either way it says which account it promoted."""
    from tessera.domain import accounts, mail
    from tessera.domain.policy import load_policy_state
    from tessera.security.passwords import PasswordHasher, normalise_password
    from tessera.timeutil import rfc3339

    def refuse(message: str) -> None:
        typer.echo(message, err=True)
        raise typer.Exit(1)

    async def run(settings: Settings, db: AsyncSession) -> str:
        user = await accounts.find_by_email(db, email)
        if user is not None:
            shown = f"{user.id} <{user.email}> created {rfc3339(user.created_at)}"
            if not promote:
                raw = (settings.admin_password.get_secret_value() if settings.admin_password
                       else typer.prompt("Password of the existing account", hide_input=True))
                try:
                    given = normalise_password(raw, new=False)
                except ValueError:
                    given = ""
                if not (given and await accounts.verify_password(
                        PasswordHasher(settings.bcrypt_rounds), user, given)):
                    refuse(f"an account with this email exists ({shown}) and the password "
                           f"given is not its password; pass --promote to make it admin")
            await accounts.promote_to_admin(db, user)
            await _forget_cached_profile(settings, user.id)
            return f"promoted {shown} to admin"
        if promote:
            refuse("no account has this email to promote; leave out --promote to create one")
        raw = (settings.admin_password.get_secret_value() if settings.admin_password
               else typer.prompt("Password", hide_input=True, confirmation_prompt=True))
        try:
            password = normalise_password(raw)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        # Like a registration, the address gets a verification mail (sent by a running
        # instance's outbox worker).
        user = await accounts.register_user(
            db, PasswordHasher(settings.bcrypt_rounds), email=email, password=password,
            policy=await load_policy_state(db), accepted_policy=False, is_admin=True,
            on_create=lambda db, user: mail.queue_verification(db, settings, user))
        await accounts.audit(db, "admin_created", user_id=user.id)
        return (f"created admin {user.id} <{user.email}> (a verification mail is queued); it "
                f"accepts the policy at its first login (POST /me/policy-consent)")

    from email_validator import EmailNotValidError, validate_email

    try:
        validate_email(email, check_deliverability=False)
    except EmailNotValidError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(_with_db(run))


@keys_cli.command("rotate")
def rotate() -> None:
    """Add a new signing key and make it current (old keys stay published until their
    tokens expire)."""
    from tessera.security.secret import load_or_create_secret
    from tessera.stores.keys import KeyCipher, create_signing_key

    async def run(settings: Settings, db: AsyncSession) -> str:
        cipher = KeyCipher(load_or_create_secret(settings))
        return await create_signing_key(db, cipher, ttl_seconds=settings.session_ttl_seconds)

    kid = _with_db(run)
    typer.echo(f"new current signing key: {kid}")


@cli.command()
def purge() -> None:
    """Delete usage events past retention, signing keys past their last token, and sent mails
    past TESSERA_MAIL_RETENTION_DAYS (with used or expired mail tokens)."""
    from tessera.stores.keys import purge_expired_keys
    from tessera.stores.mail import purge_mail
    from tessera.stores.usage import purge_usage

    async def run(settings: Settings, db: AsyncSession) -> str:
        events = await purge_usage(db, settings.usage_retention_days)
        keys = await purge_expired_keys(db)
        mails = await purge_mail(db, settings.mail_retention_days)
        return (f"purged {events} usage events, {keys} expired signing keys and {mails} "
                "mail records")

    typer.echo(_with_db(run))


@mail_cli.command("test")
def mail_test(address: str) -> None:
    """Send a test mail to ADDRESS now, through the configured transport (TESSERA_SMTP_URL,
    or an .eml file in <data>/outbox/), by way of the outbox like every mail."""
    from email_validator import EmailNotValidError, validate_email

    from tessera.domain.mail import MailWorker, queue_mail
    from tessera.metrics import Metrics
    from tessera.ops.logs import configure_logging
    from tessera.stores.db import create_engine, session_factory
    from tessera.stores.mail import OutboxMail

    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise typer.BadParameter(str(exc)) from None

    async def run() -> tuple[bool, str]:
        settings = Settings()
        engine = create_engine(settings.resolved_database_url)
        factory = session_factory(engine)
        worker = MailWorker(factory, settings, Metrics())
        try:
            async with factory() as db:
                row = queue_mail(db, settings, user_id=None, to=address, kind="test",
                                 context={})
                await db.commit()
                mail_id = row.id
            # A running instance may claim it first: then wait for that one's attempt.
            deadline = time.monotonic() + settings.mail_smtp_timeout_seconds + 5
            while True:
                await worker.run_once()
                async with factory() as db:
                    left = await db.get(OutboxMail, mail_id)
                if left is None:
                    return True, worker.transport.description
                if left.attempts > 0 or time.monotonic() > deadline:
                    return False, (f"{worker.transport.description}: "
                                   f"{left.last_error or 'still queued'}")
                await asyncio.sleep(0.2)
        finally:
            await engine.dispose()

    configure_logging("warning")
    sent, where = asyncio.run(run())
    if not sent:
        typer.echo(f"test mail not sent yet ({where}); it stays queued for retries", err=True)
        raise typer.Exit(1)
    typer.echo(f"test mail sent through {where}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
