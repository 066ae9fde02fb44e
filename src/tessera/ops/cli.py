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
    proxy_headers: Annotated[bool, typer.Option(help="Trust X-Forwarded-* from "
                                                "--forwarded-allow-ips.")] = False,
    forwarded_allow_ips: Annotated[str, typer.Option()] = "127.0.0.1",
) -> None:
    """Apply pending migrations, then serve (uvloop, httptools, no access log)."""
    import uvicorn

    from tessera.ops import migrate
    from tessera.ops.embedded import EmbeddedRedis
    from tessera.ops.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    migrate.upgrade(settings)
    embedded = None
    if settings.embedded_redis:
        # Started once here, so every worker shares one embedded Redis.
        embedded = EmbeddedRedis(settings.data_dir)
        os.environ["TESSERA_REDIS_URL"] = embedded.start()
    # uvicorn re-raises SIGTERM after its graceful shutdown; exit through Python instead, so
    # the `finally` below stops the embedded redis-server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        uvicorn.run("tessera.main:create_app", factory=True, host=host, port=port, workers=workers,
                    loop="uvloop", http="httptools", access_log=False, log_config=None,
                    proxy_headers=proxy_headers, forwarded_allow_ips=forwarded_allow_ips,
                    timeout_graceful_shutdown=20, server_header=False)
    finally:
        if embedded is not None:
            embedded.stop()


@cli.command()
def migrate() -> None:
    """Upgrade the configured database to the newest schema (alembic upgrade head)."""
    from tessera.ops import migrate as migrations

    migrations.upgrade(Settings())
    typer.echo("database is at the newest schema")


async def _with_db(fn: Callable[[Settings, AsyncSession], Awaitable[T]]) -> T:
    from tessera.stores.db import create_engine, session_factory

    settings = Settings()
    engine = create_engine(settings.resolved_database_url)
    try:
        async with session_factory(engine)() as db:
            return await fn(settings, db)
    finally:
        await engine.dispose()


@cli.command("create-admin")
def create_admin(email: str) -> None:
    """Create an admin (password from TESSERA_ADMIN_PASSWORD or a prompt), or promote a user."""
    from tessera.domain import accounts, mail
    from tessera.domain.policy import load_policy_state
    from tessera.ops import migrate as migrations
    from tessera.security.passwords import PasswordHasher, normalise_password

    settings = Settings()
    migrations.upgrade(settings)

    async def run(settings: Settings, db: AsyncSession) -> str:
        user = await accounts.find_by_email(db, email)
        if user is not None:
            user.is_admin = True
            db.add(user)
            await accounts.audit(db, "admin_promoted", user_id=user.id, commit=False)
            await db.commit()
            return f"promoted {user.id} to admin"
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
            policy=await load_policy_state(db), is_admin=True,
            on_create=lambda db, user: mail.queue_verification(db, settings, user))
        await accounts.audit(db, "admin_created", user_id=user.id)
        return f"created admin {user.id} (a verification mail is queued)"

    from email_validator import EmailNotValidError, validate_email

    try:
        validate_email(email, check_deliverability=False)
    except EmailNotValidError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(asyncio.run(_with_db(run)))


@keys_cli.command("rotate")
def rotate() -> None:
    """Add a new signing key and make it current (old keys stay published until their
    tokens expire)."""
    from tessera.security.secret import load_or_create_secret
    from tessera.stores.keys import KeyCipher, create_signing_key

    async def run(settings: Settings, db: AsyncSession) -> str:
        cipher = KeyCipher(load_or_create_secret(settings))
        return await create_signing_key(db, cipher, ttl_seconds=settings.session_ttl_seconds)

    kid = asyncio.run(_with_db(run))
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

    typer.echo(asyncio.run(_with_db(run)))


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
