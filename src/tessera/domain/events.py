"""Events to the services around tessera, and the mailing vendor connector (P8).

- `emit(db, type, data)` adds one outbox row to the caller's unit of work: the event is
  committed with the change it announces, or not at all, and costs no round trip of its own.
- `queue_vendor(...)` does the same for the mailing vendor: the only path by which personal
  data (an email address) leaves tessera.
- `EventWorker` (started by the lifespan on every instance) fans events out to the webhook
  subscriptions, and delivers due rows: each claimed with a lease, signed anew per attempt
  (Standard Webhooks), retried with exponential backoff and jitter for at least 24 hours.

Event names and payloads are documented in docs/events.md. Payloads carry ids only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, delete, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.config import Settings
from tessera.stores.events import (
    Disclosure,
    OutboxEvent,
    VendorMessage,
    WebhookDelivery,
    WebhookSubscription,
    claim,
    due_deliveries,
    due_vendor_messages,
)
from tessera.stores.keys import KeyCipher
from tessera.stores.models import User, new_id, utcnow
from tessera.timeutil import as_utc, rfc3339

log = logging.getLogger("tessera.events")

EVENT_TYPES = (
    "user.created", "user.email_verified", "user.email_changed", "user.password_changed",
    "user.deactivated", "user.reactivated", "user.deleted", "user.erased", "consent.changed",
    "restriction.changed", "session.revoked",
)
ALL_EVENTS = "*"

VENDOR_UPSERT = "vendor.contact_upsert"
VENDOR_DELETE = "vendor.contact_delete"
VENDOR_RECIPIENT = "mailing_vendor"

# Delivered deliveries and their events are kept this long for GET .../deliveries.
KEEP_DELIVERED = timedelta(days=7)
PURGE_EVERY_SECONDS = 60.0
KEEP_DELETION_NOTICE = timedelta(hours=1)


# --- writing (in the caller's transaction) ---------------------------------------------------


def check_type(type: str) -> None:
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")


def emit(db: AsyncSession, type: str, data: dict[str, Any]) -> None:
    """Queue an event in the caller's unit of work (committed with it). `data` holds ids
    (user_id, session_id, purpose) and flags, never an email or other personal data."""
    check_type(type)
    db.add(OutboxEvent(type=type, data=json.dumps(data, separators=(",", ":")),
                       user_id=data.get("user_id")))


async def forget_events(db: AsyncSession, user_id: str) -> None:
    """An account is deleted: its earlier events (and their deliveries) go; only the
    `user.deleted` emitted next carries the id, until it is delivered (P9)."""
    ids = select(OutboxEvent.id).where(col(OutboxEvent.user_id) == user_id)
    await db.exec(delete(WebhookDelivery).where(col(WebhookDelivery.event_id).in_(ids)))
    await db.exec(delete(OutboxEvent).where(col(OutboxEvent.user_id) == user_id))


def vendor_enabled(settings: Settings) -> bool:
    return bool(settings.mailing_vendor_url)


def queue_vendor(db: AsyncSession, settings: Settings, user_id: str, type: str,
                 email: str) -> None:
    """Queue a message for the mailing vendor in the caller's unit of work. Callers decide
    on consent (domain/consents.py `hand_over_to_mailing_vendor` for upserts)."""
    if not vendor_enabled(settings):
        return
    db.add(VendorMessage(user_id=user_id, type=type, email=email))


async def drop_pending_upserts(db: AsyncSession, user_id: str) -> None:
    """Before a delete: upserts not yet sent (and not in flight) never go out."""
    now = utcnow()
    await db.exec(delete(VendorMessage).where(
        col(VendorMessage.user_id) == user_id, col(VendorMessage.type) == VENDOR_UPSERT,
        (col(VendorMessage.claimed_until).is_(None)) | (col(VendorMessage.claimed_until) < now)))


async def forget_at_vendor(db: AsyncSession, settings: Settings, user: User,
                           consented: bool) -> None:
    """The account is deleted or erased: a vendor that holds the email is told to delete it.
    Call it before the email is erased, in the same unit of work."""
    if not vendor_enabled(settings) or user.email is None:
        return
    await drop_pending_upserts(db, user.id)
    if consented:
        queue_vendor(db, settings, user.id, VENDOR_DELETE, user.email)


def on_email_changed_at_vendor(db: AsyncSession, settings: Settings, user_id: str,
                               old_email: str, new_email: str, consented: bool) -> None:
    """For the email change feature: a consenting user's old address is deleted at the vendor
    and the new one upserted, in this order."""
    if consented and old_email.casefold() != new_email.casefold():
        queue_vendor(db, settings, user_id, VENDOR_DELETE, old_email)
        queue_vendor(db, settings, user_id, VENDOR_UPSERT, new_email)


async def disclosures_of(db: AsyncSession, user_id: str) -> list[dict[str, Any]]:
    rows = (await db.exec(select(Disclosure).where(Disclosure.user_id == user_id)
                          .order_by(col(Disclosure.at), col(Disclosure.id)))).all()
    return [{"at": rfc3339(r.at), "recipient": r.recipient, "fields": json.loads(r.fields),
             "purpose": r.purpose} for r in rows]


# --- subscriptions ---------------------------------------------------------------------------


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a secret: the bytes after `whsec_` (base64), else the text itself."""
    if secret.startswith("whsec_"):
        with contextlib.suppress(ValueError):
            return base64.b64decode(secret[len("whsec_"):], validate=True)
    return secret.encode()


def sign(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks: `v1,` + base64 HMAC-SHA256 over `id.timestamp.body`."""
    mac = hmac.new(key, msg_id.encode() + b"." + timestamp.encode() + b"." + body,
                   hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def subscribed(events: Iterable[str], type: str) -> bool:
    return ALL_EVENTS in events or type in events


def _aad(subscription_id: str) -> str:
    return "webhook:" + subscription_id


async def create_subscription(db: AsyncSession, cipher: KeyCipher, *, url: str,
                              events: list[str], description: str | None,
                              ) -> tuple[WebhookSubscription, str]:
    secret = new_webhook_secret()
    row = WebhookSubscription(url=url, events=json.dumps(sorted(set(events))),
                              description=description, secret_enc="")
    row.secret_enc = cipher.encrypt(secret.encode(), _aad(row.id))
    db.add(row)
    await db.commit()
    return row, secret


# --- SSRF guard ------------------------------------------------------------------------------


class UnsafeURL(ValueError):
    """A webhook or vendor URL tessera refuses to call."""


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_allowed(host: str, allowed_hosts: Iterable[str]) -> bool:
    return host.lower().rstrip(".") in {h.lower().rstrip(".") for h in allowed_hosts}


def check_url_shape(url: str, allowed_hosts: Iterable[str]) -> tuple[str, int, bool]:
    """(host, port, allowed): https only, plain http only for an allowed host; no
    credentials in the URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeURL("not a valid URL") from None
    host = parts.hostname
    if parts.scheme not in ("https", "http") or not host:
        raise UnsafeURL("the URL must be https://host/...")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("the URL must not carry credentials")
    allowed = host_allowed(host, allowed_hosts)
    if parts.scheme == "http" and not allowed:
        raise UnsafeURL("the URL must be https:// (plain http only for an allowed host)")
    return host, port or (443 if parts.scheme == "https" else 80), allowed


async def public_addresses(host: str, port: int) -> list[str]:
    """The host's addresses, all of them public, else UnsafeURL."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise UnsafeURL("the host does not resolve") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses or not all(_is_public(a) for a in addresses):
        raise UnsafeURL("the host resolves to a loopback, private or reserved address; "
                        "list it in TESSERA_WEBHOOK_ALLOWED_HOSTS to allow it")
    return addresses


async def check_url(url: str, allowed_hosts: Iterable[str]) -> None:
    host, port, allowed = check_url_shape(url, allowed_hosts)
    if not allowed:
        await public_addresses(host, port)


async def pinned_request(url: str, allowed_hosts: Iterable[str],
                         ) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Checked again at delivery (DNS may have changed), and the connection pinned to the
    address checked, so a second lookup cannot point it elsewhere (DNS rebinding): the URL
    names the address, `Host` and TLS SNI (and certificate check) name the host."""
    host, port, allowed = check_url_shape(url, allowed_hosts)
    if allowed:
        return url, {}, {}
    address = (await public_addresses(host, port))[0]
    parts = urlsplit(url)
    literal = f"[{address}]" if ":" in address else address
    netloc = literal + (f":{parts.port}" if parts.port else "")
    return (urlunsplit(parts._replace(netloc=netloc)), {"Host": parts.netloc},
            {"sni_hostname": host})


# --- delivery --------------------------------------------------------------------------------


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """After the n-th failed attempt: base * 3^(n-1), capped, with jitter (50-100 %), so a
    receiver coming back is not met by every instance's retries at once."""
    delay = min(cap, base * 3 ** max(0, min(attempts - 1, 30)))
    return delay * random.uniform(0.5, 1.0)  # noqa: S311 (jitter, not a secret)


# How long a stopping worker may take to finish its round (a delivery times out sooner).
STOP_GRACE_SECONDS = 30.0


class EventWorker:
    """Fans events out and delivers webhooks and vendor messages, on every instance."""

    def __init__(self, factory: async_sessionmaker[AsyncSession], settings: Settings,
                 cipher: KeyCipher) -> None:
        self._factory = factory
        self._settings = settings
        self._cipher = cipher
        self.worker_id = new_id()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._last_purge = 0.0

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # No proxies from the environment (trust_env): the SSRF guard checks where it
            # connects. Redirects are not followed.
            self._client = httpx.AsyncClient(timeout=self._settings.webhook_timeout_seconds,
                                             follow_redirects=False, trust_env=False)
        return self._client

    def start(self) -> None:
        if self._settings.events_worker:
            self._task = asyncio.create_task(self._run(), name="tessera-event-worker")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        # A delivery cut short keeps its lease; it is retried when the lease runs out.
        # Asked to stop first, cancelled only past a grace period: a database call cancelled
        # midway (asyncpg under SQLAlchemy) can leave its connection's cleanup waiting.
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            done, _ = await asyncio.wait({self._task}, timeout=STOP_GRACE_SECONDS)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                busy = await self.run_once()
            except Exception:  # the database may be down: try again at the next tick
                log.warning("event worker tick failed", exc_info=True)
                busy = 0
            if busy:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.webhook_poll_seconds)
            self._wake.clear()

    async def run_once(self) -> int:
        """One round: fan out, deliver what is due. Returns how many rows it handled."""
        fanned = await self.fan_out()
        now = utcnow()
        limit = self._settings.webhook_batch
        async with self._factory() as db:
            deliveries = await due_deliveries(db, now, limit)
            vendor = (await due_vendor_messages(db, now, limit)
                      if vendor_enabled(self._settings) else [])
        results = await asyncio.gather(*(self._deliver_webhook(d) for d in deliveries),
                                       *(self._deliver_vendor(v) for v in vendor),
                                       return_exceptions=True)
        for result in results:  # one broken row must not hold up the others
            if isinstance(result, Exception):
                log.warning("event delivery failed: %s", type(result).__name__)
        if time.monotonic() - self._last_purge > PURGE_EVERY_SECONDS:
            self._last_purge = time.monotonic()
            await self.purge()
        return fanned + len(deliveries) + len(vendor)

    async def fan_out(self) -> int:
        """One delivery per matching subscription for each new event, exactly once across
        instances: the conditional UPDATE on `fanned_out` lets one of them do it."""
        async with self._factory() as db:
            events = (await db.exec(select(OutboxEvent).where(
                col(OutboxEvent.fanned_out).is_(False))
                .order_by(col(OutboxEvent.created_at), col(OutboxEvent.id)).limit(200))).all()
            if not events:
                return 0
            subscriptions = (await db.exec(select(WebhookSubscription))).all()
            wanted = [(s, json.loads(s.events)) for s in subscriptions]
            now = utcnow()
            done = 0
            for event in events:
                taken = await db.exec(update(OutboxEvent).where(
                    col(OutboxEvent.id) == event.id, col(OutboxEvent.fanned_out).is_(False))
                    .values(fanned_out=True))
                if taken.rowcount != 1:
                    continue
                done += 1
                for subscription, names in wanted:
                    if (subscribed(names, event.type)
                            and as_utc(subscription.created_at) <= as_utc(event.created_at)):
                        db.add(WebhookDelivery(subscription_id=subscription.id,
                                               event_id=event.id, type=event.type,
                                               next_attempt_at=now))
            try:
                await db.commit()
            except IntegrityError:  # a subscription deleted meanwhile: again next round
                await db.rollback()
                return 0
            return done

    async def _claim(self, table: Any, row_id: Any) -> datetime | None:
        now = utcnow()
        until = now + timedelta(seconds=self._settings.webhook_lease_seconds)
        async with self._factory() as db:
            if not await claim(db, table, row_id, now=now, until=until, worker=self.worker_id):
                await db.rollback()
                return None
            await db.commit()
        return now

    async def _post(self, url: str, msg_id: str, body: bytes, key: bytes,
                    ) -> tuple[int | None, str | None]:
        """One signed attempt: (status code, error)."""
        try:
            target, headers, extensions = await pinned_request(
                url, self._settings.webhook_allowed_hosts)
        except UnsafeURL as exc:
            return None, f"refused: {exc}"[:200]
        timestamp = str(int(time.time()))
        headers.update({
            "Content-Type": "application/json", "User-Agent": "tessera-webhooks",
            "webhook-id": msg_id, "webhook-timestamp": timestamp,
            "webhook-signature": sign(key, msg_id, timestamp, body)})
        try:
            response = await self._http().post(target, content=body, headers=headers,
                                               extensions=extensions)
        except httpx.HTTPError as exc:
            return None, type(exc).__name__
        return response.status_code, None

    def _next_attempt(self, attempts: int) -> datetime:
        s = self._settings
        return utcnow() + timedelta(seconds=backoff_seconds(
            attempts, s.webhook_backoff_base_seconds, s.webhook_backoff_max_seconds))

    async def _deliver_webhook(self, delivery_id: str) -> None:
        started = await self._claim(WebhookDelivery, delivery_id)
        if started is None:
            return  # another instance has it
        async with self._factory() as db:
            delivery = await db.get(WebhookDelivery, delivery_id)
            subscription = (await db.get(WebhookSubscription, delivery.subscription_id)
                            if delivery else None)
            event = await db.get(OutboxEvent, delivery.event_id) if delivery else None
        if delivery is None or subscription is None or event is None:
            return  # the subscription was deleted meanwhile
        key = secret_bytes(self._cipher.decrypt(subscription.secret_enc,
                                                _aad(subscription.id)).decode())
        body = json.dumps({"type": event.type, "timestamp": rfc3339(event.created_at),
                           "data": json.loads(event.data)}, separators=(",", ":")).encode()
        status, error = await self._post(subscription.url, event.id, body, key)
        attempts = delivery.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_status_code": status,
                                  "last_error": error, "claimed_until": None,
                                  "claimed_by": None}
        if status is not None and 200 <= status < 300:
            values.update(status="delivered", delivered_at=utcnow())
        elif utcnow() - as_utc(delivery.created_at) >= timedelta(
                seconds=self._settings.webhook_retry_seconds):
            values.update(status="failed")
            log.warning("webhook delivery %s failed for good after %d attempts",
                        delivery_id, attempts)
        else:
            values.update(next_attempt_at=self._next_attempt(attempts))
        async with self._factory() as db:
            await db.exec(update(WebhookDelivery).where(
                col(WebhookDelivery.id) == delivery_id,
                col(WebhookDelivery.claimed_by) == self.worker_id).values(**values))
            await db.commit()

    async def _deliver_vendor(self, message_id: int) -> None:
        s = self._settings
        if await self._claim(VendorMessage, message_id) is None:
            return
        async with self._factory() as db:
            message = await db.get(VendorMessage, message_id)
        if message is None or not s.mailing_vendor_url:
            return
        key = secret_bytes(s.mailing_vendor_secret.get_secret_value()
                           if s.mailing_vendor_secret else "")
        body = json.dumps({"type": message.type, "email": message.email},
                          separators=(",", ":")).encode()
        status, error = await self._post(s.mailing_vendor_url, f"vnd_{message.id}", body, key)
        async with self._factory() as db:
            mine = (col(VendorMessage.id) == message_id,
                    col(VendorMessage.claimed_by) == self.worker_id)
            if status is not None and 200 <= status < 300:
                # Delivered: the email leaves the outbox; the disclosure is kept with the user.
                gone = await db.exec(delete(VendorMessage).where(*mine))
                user = await db.get(User, message.user_id)
                if gone.rowcount == 1 and user is not None and user.email is not None:
                    db.add(Disclosure(user_id=message.user_id, recipient=VENDOR_RECIPIENT,
                                      fields=json.dumps(["email"]), purpose=message.type))
                try:
                    await db.commit()
                except IntegrityError:  # the account was deleted meanwhile
                    await db.rollback()
                    await db.exec(delete(VendorMessage).where(*mine))
                    await db.commit()
                return
            # Kept and retried (capped backoff) until the vendor takes it: a delete must not
            # be dropped.
            log.warning("mailing vendor message not delivered (%s)", error or status)
            await db.exec(update(VendorMessage).where(*mine).values(
                attempts=message.attempts + 1, last_status_code=status, claimed_until=None,
                claimed_by=None, next_attempt_at=self._next_attempt(message.attempts + 1)))
            await db.commit()

    async def purge(self) -> None:
        """Events whose deliveries are all done go (deliveries with them): after a week, and a
        deleted account's `user.deleted` (the last row with its id, P9) after an hour."""
        cutoff = utcnow() - KEEP_DELIVERED
        async with self._factory() as db:
            pending = select(WebhookDelivery.event_id).where(
                WebhookDelivery.status == "pending")
            old = (await db.exec(select(OutboxEvent.id).where(
                col(OutboxEvent.fanned_out).is_(True),
                (col(OutboxEvent.created_at) < cutoff)
                | ((col(OutboxEvent.type) == "user.deleted")
                   & (col(OutboxEvent.created_at) < utcnow() - KEEP_DELETION_NOTICE)),
                col(OutboxEvent.id).not_in(pending)).limit(1000))).all()
            if old:
                await db.exec(delete(WebhookDelivery).where(
                    col(WebhookDelivery.event_id).in_(old)))
                await db.exec(delete(OutboxEvent).where(
                    col(OutboxEvent.id).in_(old)))
                await db.commit()
