"""Ed25519 signing keys: stored in the database, private halves encrypted with the secret.

Every instance on one database signs with the newest key and publishes every key whose
tokens may still be alive, so a rotation on one instance reaches all of them within
`keys_cache_seconds`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import or_
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tessera.stores.models import SigningKey, utcnow


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def derive_key(secret: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose, derived from the service secret (HKDF-SHA256)."""
    return HKDF(algorithm=SHA256(), length=32, salt=b"tessera/v1", info=purpose).derive(secret)


class KeyCipher:
    def __init__(self, secret: bytes) -> None:
        self._aead = AESGCM(derive_key(secret, b"signing-key-encryption"))

    def encrypt(self, plaintext: bytes, kid: str) -> str:
        nonce = os.urandom(12)
        return b64url(nonce + self._aead.encrypt(nonce, plaintext, kid.encode()))

    def decrypt(self, token: str, kid: str) -> bytes:
        raw = b64url_decode(token)
        return self._aead.decrypt(raw[:12], raw[12:], kid.encode())


@dataclass(frozen=True)
class LoadedKey:
    kid: str
    public: Ed25519PublicKey
    public_x: str
    private: Ed25519PrivateKey | None  # None once retired: it only verifies


def public_jwk(key: LoadedKey) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": key.public_x, "kid": key.kid,
            "alg": "EdDSA", "use": "sig"}


def _new_kid() -> str:
    return time.strftime("%Y%m%d") + "-" + secrets.token_hex(4)


async def create_signing_key(db: AsyncSession, cipher: KeyCipher, *, ttl_seconds: int) -> str:
    """Add a new key and make it current; keys before it retire but stay published."""
    now = utcnow()
    current = select(SigningKey).where(col(SigningKey.retired_at).is_(None))
    for old in (await db.exec(current)).all():
        old.retired_at = now
        old.publish_until = now + timedelta(seconds=ttl_seconds)
        db.add(old)
    private = Ed25519PrivateKey.generate()
    kid = _new_kid()
    raw_private = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw_public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    db.add(SigningKey(kid=kid, public_x=b64url(raw_public),
                      private_enc=cipher.encrypt(raw_private, kid), created_at=now))
    await db.commit()
    return kid


class KeyRing:
    """In-process view of the signing keys, refreshed from the database now and then."""

    def __init__(self, factory: async_sessionmaker[AsyncSession], cipher: KeyCipher,
                 *, ttl_seconds: int, cache_seconds: float) -> None:
        self._factory = factory
        self._cipher = cipher
        self._ttl = ttl_seconds
        self._cache_seconds = cache_seconds
        self._loaded_at = -1e18
        self.current: LoadedKey | None = None
        self.published: dict[str, LoadedKey] = {}
        self.jwks_fingerprint = ""

    async def ensure_key(self) -> None:
        """At start-up: make sure a current key exists (the first instance creates it)."""
        async with self._factory() as db:
            existing = (await db.exec(select(SigningKey).where(
                col(SigningKey.retired_at).is_(None)))).first()
            if existing is None:
                await create_signing_key(db, self._cipher, ttl_seconds=self._ttl)
        await self.refresh()

    async def refresh(self) -> None:
        now = utcnow()
        async with self._factory() as db:
            rows = (await db.exec(
                select(SigningKey)
                .where(or_(col(SigningKey.publish_until).is_(None),
                           col(SigningKey.publish_until) > now))
                .order_by(col(SigningKey.created_at).desc())
            )).all()
        published: dict[str, LoadedKey] = {}
        current: LoadedKey | None = None
        for row in rows:
            public = Ed25519PublicKey.from_public_bytes(b64url_decode(row.public_x))
            private = None
            if row.retired_at is None and current is None:
                private = Ed25519PrivateKey.from_private_bytes(
                    self._cipher.decrypt(row.private_enc, row.kid))
            key = LoadedKey(row.kid, public, row.public_x, private)
            if private is not None:
                current = key
            published[row.kid] = key
        self.published = published
        self.current = current
        kids = ",".join(sorted(published)).encode()
        self.jwks_fingerprint = hashlib.sha256(kids).hexdigest()[:16]
        self._loaded_at = time.monotonic()

    async def maybe_refresh(self) -> None:
        if time.monotonic() - self._loaded_at >= self._cache_seconds:
            await self.refresh()

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [public_jwk(k) for k in self.published.values()]}


async def purge_expired_keys(db: AsyncSession, now: datetime | None = None) -> int:
    now = now or utcnow()
    rows = (await db.exec(select(SigningKey).where(
        col(SigningKey.publish_until).is_not(None), col(SigningKey.publish_until) <= now))).all()
    for row in rows:
        await db.delete(row)
    await db.commit()
    return len(rows)
