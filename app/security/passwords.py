"""Password hashing: NFKC, 8-256 characters, bcrypt over SHA-256 (no 72-byte truncation)."""

from __future__ import annotations

import unicodedata

import anyio.to_thread
from passlib.context import CryptContext

MIN_LENGTH = 8
MAX_LENGTH = 256


def normalise_password(raw: str) -> str:
    """NFKC, then the contract's rules. Raises ValueError with a message safe to show."""
    if any(unicodedata.category(ch) == "Cc" for ch in raw):
        raise ValueError("password must not contain control characters")
    password = unicodedata.normalize("NFKC", raw)
    if len(password) < MIN_LENGTH:
        raise ValueError(f"password must be at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise ValueError(f"password must be at most {MAX_LENGTH} characters")
    return password


class PasswordHasher:
    """bcrypt_sha256: the password is HMAC-SHA256'd before bcrypt, so bytes past 72 count."""

    def __init__(self, rounds: int) -> None:
        self._context = CryptContext(
            schemes=["bcrypt_sha256", "bcrypt"],
            deprecated=["bcrypt"],
            bcrypt_sha256__rounds=rounds,
        )
        # Verified against when the email is unknown, so that costs what a wrong password does.
        self._dummy_hash = self._context.hash("tessera-timing-equaliser")

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self._context.hash, password)

    async def verify(self, password: str, stored_hash: str | None) -> tuple[bool, str | None]:
        """(ok, new_hash): new_hash is set when the stored hash should be upgraded."""
        if stored_hash is None:
            await anyio.to_thread.run_sync(self._context.verify, password, self._dummy_hash)
            return False, None
        return await anyio.to_thread.run_sync(self._verify_and_update, password, stored_hash)

    def _verify_and_update(self, password: str, stored_hash: str) -> tuple[bool, str | None]:
        try:
            return self._context.verify_and_update(password, stored_hash)
        except ValueError:  # unparseable stored hash: treat as a mismatch, never a 500
            return False, None
