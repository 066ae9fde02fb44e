"""Transactional mail: templates, one-time tokens, the durable outbox and its worker.

Code that causes a mail calls `queue_mail` (or one of the `queue_*` helpers) with its own
`db`: the mail row, and the token it carries, are written in the same transaction as the
change that caused them, and nothing is sent until that commits. `MailWorker` (started in
the app's lifespan) drains the outbox with retries and exponential backoff; a row is claimed
by one conditional UPDATE, so two instances never send it at once. Transports: SMTP
(aiosmtplib; `TESSERA_SMTP_URL`) or, with none configured, `.eml` files in
`<TESSERA_DATA_DIR>/outbox/`. Tokens and bodies are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import os
import random
import re
import secrets
import string
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from email import quoprimime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import anyio.to_thread
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.config import Settings
from tessera.metrics import Metrics
from tessera.stores import mail as store
from tessera.stores.mail import MailToken, OutboxMail
from tessera.stores.models import User, utcnow

log = logging.getLogger("tessera.mail")

KINDS = ("verify", "reset", "email_change", "email_change_notice", "password_changed",
         "account_deleted", "test")
# Where the links in mails point, below TESSERA_PUBLIC_URL; the token travels in the
# fragment, which browsers never send to a server (so no proxy log or Referer carries it).
LINK_PATHS = {"verify": "/verify-email", "reset": "/reset-password",
              "email_change": "/confirm-email"}


# --- templates ---------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _template(override_dir: str | None, name: str) -> string.Template:
    if override_dir is not None:
        path = Path(override_dir) / name
        if path.is_file():
            return string.Template(path.read_text(encoding="utf-8"))
    text = resources.files("tessera.domain").joinpath("mail_templates", name).read_text(
        encoding="utf-8")
    return string.Template(text)


def render(settings: Settings, kind: str, context: dict[str, Any]) -> tuple[str, str, str]:
    """(subject, plain text, HTML) of a mail kind. `<kind>.txt` starts with a `Subject:`
    line; `<kind>.html` is the HTML body inside `_layout.html`. Values are escaped in HTML."""
    override = str(settings.mail_templates_dir) if settings.mail_templates_dir else None
    values = {"public_url": settings.public_url, **{k: str(v) for k, v in context.items()}}
    text = _template(override, f"{kind}.txt").safe_substitute(values)
    first, _, body = text.partition("\n")
    subject = first.removeprefix("Subject:").strip() if first.startswith("Subject:") else kind
    escaped = {k: html.escape(v) for k, v in values.items()}
    content = _template(override, f"{kind}.html").safe_substitute(escaped)
    page = _template(override, "_layout.html").safe_substitute(
        {**escaped, "subject": html.escape(subject), "content": content})
    return subject, body.lstrip("\n"), page


def queue_mail(db: AsyncSession, settings: Settings, *, user_id: str | None, to: str,
               kind: str, context: dict[str, Any]) -> OutboxMail:
    """Add one mail to the outbox, in `db`'s transaction: sent once that commits."""
    assert kind in KINDS, kind
    subject, text, page = render(settings, kind, {"to": to, **context})
    row = OutboxMail(user_id=user_id, to_addr=to, kind=kind, subject=subject,
                     text_body=text, html_body=page)
    db.add(row)
    return row


# --- one-time tokens ---------------------------------------------------------------------

def new_token() -> str:
    """256 bits from the CSPRNG, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def _link(settings: Settings, purpose: str, token: str) -> str:
    return f"{settings.public_url}{LINK_PATHS[purpose]}#token={token}"


def queue_verification(db: AsyncSession, settings: Settings, user: User) -> None:
    """A verification token for the user's current address, and its mail."""
    assert user.email is not None
    token = new_token()
    ttl = settings.verify_token_ttl_seconds
    store.add_token(db, token=token, purpose="verify", user_id=user.id, email=user.email,
                    ttl_seconds=ttl)
    queue_mail(db, settings, user_id=user.id, to=user.email, kind="verify", context={
        "email": user.email, "token": token, "link": _link(settings, "verify", token),
        "ttl_hours": max(1, ttl // 3600)})


def queue_reset(db: AsyncSession, settings: Settings, user: User) -> None:
    assert user.email is not None
    token = new_token()
    ttl = settings.reset_token_ttl_seconds
    store.add_token(db, token=token, purpose="reset", user_id=user.id, email=user.email,
                    ttl_seconds=ttl)
    queue_mail(db, settings, user_id=user.id, to=user.email, kind="reset", context={
        "email": user.email, "token": token, "link": _link(settings, "reset", token),
        "ttl_minutes": max(1, ttl // 60)})


async def queue_email_change(db: AsyncSession, settings: Settings, user: User,
                             new_email: str) -> None:
    """A confirmation to the new address (the token) and a notice to the old one; an
    earlier pending change stops working."""
    assert user.email is not None
    await store.end_tokens(db, user.id, "email_change")
    token = new_token()
    ttl = settings.verify_token_ttl_seconds
    store.add_token(db, token=token, purpose="email_change", user_id=user.id, email=new_email,
                    ttl_seconds=ttl)
    queue_mail(db, settings, user_id=user.id, to=new_email, kind="email_change", context={
        "email": new_email, "old_email": user.email, "token": token,
        "link": _link(settings, "email_change", token), "ttl_hours": max(1, ttl // 3600)})
    queue_mail(db, settings, user_id=user.id, to=user.email, kind="email_change_notice",
               context={"email": user.email, "new_email": new_email})


def queue_password_changed(db: AsyncSession, settings: Settings, user: User, how: str) -> None:
    if user.email is not None:
        queue_mail(db, settings, user_id=user.id, to=user.email, kind="password_changed",
                   context={"email": user.email, "how": how})


def queue_account_deleted(db: AsyncSession, settings: Settings, email: str) -> None:
    """Queued in the deletion's transaction with the address copied into the row and no
    user id, so the account's cleanup leaves it; the row is deleted once sent."""
    queue_mail(db, settings, user_id=None, to=email, kind="account_deleted",
               context={"email": email})


async def take_token(db: AsyncSession, token: str, purpose: str) -> MailToken | None:
    """The live token, marked used (atomically: two requests cannot both use it); None for an
    unknown, used or expired one. Uncommitted: the caller commits with its change."""
    row = await store.find_token(db, token, purpose)
    if row is None or not await store.use_token(db, row):
        return None
    return row


# --- transports ----------------------------------------------------------------------------

@dataclass
class Outgoing:
    """One mail as the transports take it: its bytes (`message_bytes`), or the EmailMessage
    where those do not cover it (a non-ASCII address goes out with SMTPUTF8); envelope and
    file name."""

    data: bytes | None
    message: EmailMessage | None
    sender: str
    recipient: str
    filename: str

    def as_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.message is not None
        return self.message.as_bytes()


class Transport(Protocol):
    description: str
    # Mails handed over between two commits of their outcome: a crash between a hand-over
    # and that commit sends at most this many again (their Message-ID shows the retry).
    chunk: int

    async def open(self) -> None: ...
    async def send(self, message: EmailMessage, filename: str) -> None: ...
    async def send_many(self, mails: list[Outgoing]) -> list[Exception | None]: ...
    async def close(self) -> None: ...


class FileTransport:
    """Embedded defaults: each mail as an .eml file (0600: it may carry a token)."""

    chunk = 50

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.description = f"files in {folder}"

    async def open(self) -> None:
        await anyio.to_thread.run_sync(lambda: self.folder.mkdir(parents=True, exist_ok=True))

    async def send(self, message: EmailMessage, filename: str) -> None:
        await anyio.to_thread.run_sync(self._write, filename, message.as_bytes())

    async def send_many(self, mails: list[Outgoing]) -> list[Exception | None]:
        """All the files in one trip to a worker thread: the event loop never waits on the
        file system."""
        return await anyio.to_thread.run_sync(self._write_all, mails)

    def _write_all(self, mails: list[Outgoing]) -> list[Exception | None]:
        outcomes: list[Exception | None] = []
        for mail in mails:
            try:
                self._write(mail.filename, mail.as_bytes())
                outcomes.append(None)
            except Exception as exc:  # noqa: BLE001 - this mail's attempt failed
                outcomes.append(exc)
        return outcomes

    def _write(self, name: str, data: bytes) -> None:
        final = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, final)  # a reader never sees half a mail

    async def close(self) -> None:
        return None


@dataclass
class SmtpTarget:
    host: str
    port: int
    implicit_tls: bool
    username: str | None
    password: str | None


def parse_smtp_url(url: str) -> SmtpTarget:
    parts = urlsplit(url)
    implicit = parts.scheme == "smtps"
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError("TESSERA_SMTP_URL must be smtp://[user:pass@]host[:port] or smtps://…")
    port = parts.port or (465 if implicit else (587 if parts.username else 25))
    return SmtpTarget(host=parts.hostname, port=port, implicit_tls=implicit,
                      username=unquote(parts.username) if parts.username else None,
                      password=unquote(parts.password) if parts.password else None)


class SmtpTransport:
    """One SMTP connection per batch: STARTTLS when the server offers it (smtp://), implicit
    TLS for smtps://, AUTH when the URL has credentials."""

    chunk = 10

    def __init__(self, url: str, timeout: float) -> None:
        self.target = parse_smtp_url(url)
        self.timeout = timeout
        self.description = f"SMTP {self.target.host}:{self.target.port}"
        self._client: Any = None

    async def open(self) -> None:
        import aiosmtplib

        t = self.target
        client = aiosmtplib.SMTP(hostname=t.host, port=t.port, use_tls=t.implicit_tls,
                                 start_tls=None if not t.implicit_tls else False,
                                 username=t.username, password=t.password,
                                 timeout=self.timeout)
        await client.connect()
        self._client = client

    async def send(self, message: EmailMessage, filename: str) -> None:
        await self._client.send_message(message)

    async def send_many(self, mails: list[Outgoing]) -> list[Exception | None]:
        """One after the other on the open connection (aiosmtplib: the loop never waits)."""
        outcomes: list[Exception | None] = []
        for mail in mails:
            try:
                if mail.data is None:
                    await self._client.send_message(mail.message)
                else:
                    await self._client.sendmail(mail.sender, [mail.recipient], mail.data)
                outcomes.append(None)
            except Exception as exc:  # noqa: BLE001 - this mail's attempt failed
                outcomes.append(exc)
        return outcomes

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.quit()
            except Exception:  # the connection is gone already
                client.close()


def transport_for(settings: Settings) -> Transport:
    if settings.smtp_url is not None:
        return SmtpTransport(settings.smtp_url.get_secret_value(),
                             settings.mail_smtp_timeout_seconds)
    return FileTransport(settings.data_dir.resolve() / "outbox")


def build_message(settings: Settings, mail: OutboxMail) -> EmailMessage:
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = mail.to_addr
    message["Subject"] = mail.subject
    created = store.as_aware(mail.created_at)
    message["Date"] = format_datetime(created)
    domain = parseaddr(settings.mail_from)[1].rpartition("@")[2] or "localhost"
    # The same Message-ID on every attempt: a relay or reader can tell a retry from a new mail.
    message["Message-ID"] = message_id(mail, domain)
    message["Auto-Submitted"] = "auto-generated"
    message["X-Tessera-Kind"] = mail.kind
    message.set_content(mail.text_body, cte=_transfer_encoding(mail.text_body))
    message.add_alternative(mail.html_body, subtype="html",
                            cte=_transfer_encoding(mail.html_body))
    return message


# Header values written as they are: printable ASCII, no line breaks; anything else (a
# non-ASCII subject or address, a header over 78 characters) goes through EmailMessage.
_PLAIN_HEADER = re.compile(r"[\x20-\x7e]*")
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~@-]+")


def message_bytes(settings: Settings, mail: OutboxMail) -> bytes | None:
    """The mail as `build_message(...).as_bytes()` writes it, built directly (~30x cheaper:
    EmailMessage parses every header it is given and renders through its policy); None for
    a mail this does not cover byte for byte (then `build_message` renders it)."""
    created = store.as_aware(mail.created_at)
    sender_domain = parseaddr(settings.mail_from)[1].rpartition("@")[2] or "localhost"
    headers = (("From", settings.mail_from), ("To", mail.to_addr), ("Subject", mail.subject),
               ("Date", format_datetime(created)),
               ("Message-ID", message_id(mail, sender_domain)),
               ("Auto-Submitted", "auto-generated"), ("X-Tessera-Kind", mail.kind))
    if not _PLAIN_ADDRESS.fullmatch(mail.to_addr) or not all(
            _PLAIN_HEADER.fullmatch(value) and len(name) + 2 + len(value) <= 78
            for name, value in headers) or parseaddr(settings.mail_from)[1] == "":
        return None
    parts = [_part("plain", mail.text_body), _part("html", mail.html_body)]
    boundary = f"==============={secrets.randbelow(10 ** 19):019d}=="
    while any(boundary in part for part in parts):  # as email.generator does
        boundary = f"==============={secrets.randbelow(10 ** 19):019d}=="
    lines = [f"{name}: {value}" for name, value in headers]
    lines += ["MIME-Version: 1.0", "Content-Type: multipart/alternative;",
              f' boundary="{boundary}"', "", f"--{boundary}", parts[0], f"--{boundary}",
              parts[1], f"--{boundary}--", ""]
    return "\n".join(lines).encode("ascii")


def _part(subtype: str, body: str) -> str:
    """One text part (its headers, a blank line, the body), as EmailMessage's set_content
    writes it: utf-8, 7bit where possible, else quoted-printable."""
    normal = "\n".join(body.splitlines()) + "\n"
    cte = _transfer_encoding(body)
    if cte == "7bit":
        encoded = normal
    else:
        encoded = quoprimime.body_encode(normal.encode("utf-8").decode("latin-1"), 78)
        if not encoded.endswith("\n"):
            encoded += "\n"
    extra = "\nMIME-Version: 1.0" if subtype == "html" else ""
    return (f'Content-Type: text/{subtype}; charset="utf-8"\n'
            f"Content-Transfer-Encoding: {cte}{extra}\n\n{encoded}")


def _transfer_encoding(body: str) -> str:
    """7bit where the body allows (an .eml file then reads as plain text, links and codes
    intact for a person copying them); quoted-printable otherwise."""
    if body.isascii() and all(len(line) <= 900 for line in body.splitlines()):
        return "7bit"
    return "quoted-printable"


def message_id(mail: OutboxMail, domain: str) -> str:
    """Unique to the mail, with its creation time to the microsecond: SQLite hands out the id
    of a deleted last row again (mails of no account are deleted once sent), so the id alone,
    or with the second, names two mails of one busy second alike."""
    created = store.as_aware(mail.created_at)
    return f"<tessera.{mail.id}.{int(created.timestamp())}.{created:%f}@{domain}>"


def eml_name(mail: OutboxMail) -> str:
    """`<time to the microsecond>-<id>-<kind>.eml`: unique for the reason of `message_id`."""
    created = store.as_aware(mail.created_at)
    return f"{created:%Y%m%dT%H%M%S.%f}-{mail.id:08d}-{mail.kind}.eml"


# --- the worker -----------------------------------------------------------------------------

# How long a stopping worker may take to finish its pass (an SMTP send times out sooner).
STOP_GRACE_SECONDS = 40.0


class BusyPacer:
    """How long the outbox worker rests after a pass: nothing while the process has CPU to
    spare; while it is saturated (a request flood), long enough that mail takes at most
    `share` of the time. Saturation is the process's CPU time (every thread) over wall time,
    sampled every half second."""

    SATURATED = 0.85
    SAMPLE_SECONDS = 0.5
    MAX_REST_SECONDS = 5.0

    def __init__(self, share: float, *, clock: Callable[[], float] = time.monotonic,
                 cpu: Callable[[], float] = time.process_time) -> None:
        self.share = share
        self._clock, self._cpu = clock, cpu
        self._at, self._cpu_at = clock(), cpu()
        self._saturated = False

    def saturated(self) -> bool:
        now = self._clock()
        if now - self._at >= self.SAMPLE_SECONDS:
            used = self._cpu()
            self._saturated = (used - self._cpu_at) / (now - self._at) >= self.SATURATED
            self._at, self._cpu_at = now, used
        return self._saturated

    def rest_after(self, worked_seconds: float) -> float:
        if self.share >= 1 or worked_seconds <= 0 or not self.saturated():
            return 0.0
        return min(worked_seconds * (1 / self.share - 1), self.MAX_REST_SECONDS)


class MailWorker:
    """Drains the outbox: due rows are claimed, sent, marked sent; a failed attempt is retried
    after base * 2^attempts seconds (at most max, with a little jitter) until max_attempts."""

    BATCH = 50

    def __init__(self, db_factory: async_sessionmaker[AsyncSession], settings: Settings,
                 metrics: Metrics, transport: Transport | None = None) -> None:
        self.db_factory = db_factory
        self.settings = settings
        self.metrics = metrics
        self.transport = transport or transport_for(settings)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._detached: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stop = asyncio.Event()  # cuts a rest short (a wake does not: see BusyPacer)
        self.pacer = BusyPacer(settings.mail_busy_share)

    def start(self) -> None:
        if self._task is None:
            log.info("mail: sending through %s", self.transport.description)
            self._task = asyncio.create_task(self._run(), name="tessera-mail-worker")

    def detach(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` (queueing a mail after a 202) apart from the request: neither the
        answer nor the next request on its connection waits for it, so its time tells
        nothing. Finished before the worker stops."""
        task = asyncio.create_task(work)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def stop(self) -> None:
        """Ends after the current pass: a database call cancelled midway (asyncpg under
        SQLAlchemy) can leave its connection's cleanup waiting for good, so the worker is
        asked to stop and only cancelled if it does not within a grace period."""
        if self._detached:
            await asyncio.wait(set(self._detached), timeout=10)
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self._stop.set()
            self._wake.set()
            done, _ = await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def wake(self) -> None:
        """A mail was committed on this instance: look now rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            busy = False
            started = time.monotonic()
            claimed = 0
            try:
                claimed = await self.run_once()
                busy = claimed >= self.BATCH
                await self.observe_queue()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store is down: try again at the next poll
                log.warning("mail: outbox pass failed (%s)", type(exc).__name__)
            rest = self.pacer.rest_after(time.monotonic() - started) if claimed else 0.0
            if rest and not self._stopping:  # the process is saturated: requests first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), rest)
            if busy or self._stopping:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.mail_poll_seconds)
            except TimeoutError:
                pass
            self._wake.clear()

    async def observe_queue(self) -> None:
        async with self.db_factory() as db:
            count, oldest = await store.queue_stats(db)
        self.metrics.mail_queued.set(count)
        self.metrics.mail_oldest_queued_age.set(
            (utcnow() - oldest).total_seconds() if oldest is not None else 0)

    async def run_once(self) -> int:
        """One pass: send what is due now. Returns how many rows were claimed.

        A batch costs one claiming UPDATE, one commit of its outcomes per `transport.chunk`
        mails, and for files one trip to a worker thread: the event loop renders (cheaply,
        `message_bytes`) and awaits, it never waits on a disk or a socket."""
        s = self.settings
        async with self.db_factory() as db:
            mails = await store.claim(db, s.mail_lease_seconds, self.BATCH)
        if not mails:
            return 0
        try:
            await self.transport.open()
        except Exception as exc:
            await self._record([], [(mail, exc) for mail in mails])
            return len(mails)
        sender = parseaddr(s.mail_from)[1]
        try:
            step = max(1, self.transport.chunk)
            for start in range(0, len(mails), step):
                chunk = mails[start:start + step]
                failed: list[tuple[OutboxMail, Exception]] = []
                ready: list[tuple[OutboxMail, Outgoing]] = []
                for mail in chunk:
                    try:
                        data = message_bytes(s, mail)
                        message = build_message(s, mail) if data is None else None
                        ready.append((mail, Outgoing(data, message, sender, mail.to_addr,
                                                     eml_name(mail))))
                    except Exception as exc:  # noqa: BLE001 - a mail that cannot be rendered
                        failed.append((mail, exc))
                outcomes = await self.transport.send_many([out for _, out in ready])
                sent = [mail for (mail, _), err in zip(ready, outcomes, strict=True)
                        if err is None]
                failed += [(mail, err) for (mail, _), err in zip(ready, outcomes, strict=True)
                           if err is not None]
                await self._record(sent, failed)
        finally:
            await self.transport.close()
        return len(mails)

    async def _record(self, sent: list[OutboxMail],
                      failed: list[tuple[OutboxMail, Exception]]) -> None:
        """The outcomes of a chunk of attempts, in one transaction."""
        s = self.settings
        retries: list[tuple[OutboxMail, str, Any]] = []
        for mail, exc in failed:
            retry_at = None
            if mail.attempts + 1 < s.mail_max_attempts:
                delay = min(s.mail_retry_base_seconds * 2 ** mail.attempts,
                            s.mail_retry_max_seconds)
                retry_at = utcnow() + timedelta(seconds=delay * (1 + random.random() / 10))  # noqa: S311
            retries.append((mail, type(exc).__name__, retry_at))
        async with self.db_factory() as db:
            for statement in store.record_sent(sent):
                await db.exec(statement)
            for mail, error, retry_at in retries:
                await db.exec(store.record_failed(mail, error, retry_at=retry_at))
            await db.commit()
            if any(mail.kind == "account_deleted" for mail in sent):
                # the address's last row is gone: off the WAL too
                from tessera.stores.scrub import checkpoint_sqlite

                await checkpoint_sqlite(db.bind)  # type: ignore[arg-type]
        for mail in sent:
            self.metrics.mails_sent.labels(mail.kind).inc()
            log.info("mail: %s mail %s sent", mail.kind, mail.id)
        for mail, error, retry_at in retries:
            outcome = "retry" if retry_at is not None else "given_up"
            self.metrics.mail_failures.labels(mail.kind, outcome).inc()
            log.warning("mail: %s mail %s attempt %d failed (%s); %s", mail.kind, mail.id,
                        mail.attempts + 1, error, outcome)


