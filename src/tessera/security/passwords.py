"""Password hashing: NFKC, 8-256 characters, bcrypt over SHA-256 (no 72-byte truncation)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from passlib.context import CryptContext

log = logging.getLogger("tessera.passwords")
T = TypeVar("T")

MIN_LENGTH = 8
MAX_LENGTH = 256
# bcrypt runs in threads of their own at this nice value (Linux: per thread). When logins and
# token checks contend for a core, the event loop gets ~3/4 of it rather than half, so a
# login flood slows the session checks every other service depends on less; an idle loop
# leaves the hashing threads the whole core (docs/performance.md, "mixed").
HASH_THREAD_NICE = 5


def _lower_priority() -> None:
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_THREAD_NICE)
        except OSError:  # not allowed here: run at the normal priority
            log.warning("could not lower the password-hashing threads' priority")


def _hash_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(4, 2 * cores)  # CPU-bound: more would only take turns


def normalise_password(raw: str, *, new: bool = True) -> str:
    """NFKC, then the contract's rules. Raises ValueError with a message safe to show.

    The minimum holds for the code points typed and for the normalised text both: one code
    point that NFKC expands (U+FDFA becomes 18 characters) is one character, not 18. A
    password presented to be checked (`new=False`) is held to the normalised length only, so
    an account whose password was set before that rule still logs in."""
    if any(unicodedata.category(ch) == "Cc" for ch in raw):
        raise ValueError("password must not contain control characters")
    password = unicodedata.normalize("NFKC", raw)
    if (new and len(raw) < MIN_LENGTH) or len(password) < MIN_LENGTH:
        raise ValueError(f"password must be at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise ValueError(f"password must be at most {MAX_LENGTH} characters")
    return password


class PasswordHasher:
    """bcrypt_sha256: the password is HMAC-SHA256'd before bcrypt, so bytes past 72 count."""

    def __init__(self, rounds: int, *, per_account: int = 2) -> None:
        self._context = CryptContext(
            schemes=["bcrypt_sha256", "bcrypt"],
            deprecated=["bcrypt"],
            bcrypt_sha256__rounds=rounds,
        )
        # Verified against when the email is unknown, so that costs what a wrong password does.
        self._dummy_hash = self._context.hash("tessera-timing-equaliser")
        self._threads = ThreadPoolExecutor(_hash_threads(), thread_name_prefix="tessera-hash",
                                           initializer=_lower_priority)
        # Fairness: at most `per_account` hashes of one account run (or wait in the pool's
        # queue) at a time; the others wait here, so one account's flood does not fill the
        # pool's queue ahead of everyone else's logins.
        self._per_account = per_account
        self._accounts: dict[str, tuple[asyncio.Semaphore, int]] = {}

    async def _run(self, fn: Callable[..., T], *args: str, account: str | None = None) -> T:
        if account is None:
            return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)
        gate, users = self._accounts.get(account, (None, 0))
        if gate is None:
            gate = asyncio.Semaphore(self._per_account)
        self._accounts[account] = (gate, users + 1)
        try:
            async with gate:
                return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)
        finally:
            gate, users = self._accounts[account]
            if users == 1:
                del self._accounts[account]
            else:
                self._accounts[account] = (gate, users - 1)

    def waiting_accounts(self) -> int:
        """Accounts with a hash running or waiting (for tests and metrics)."""
        return len(self._accounts)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def hash(self, password: str, *, account: str | None = None) -> str:
        return await self._run(self._context.hash, password, account=account)

    async def verify(self, password: str, stored_hash: str | None, *,
                     account: str | None = None) -> tuple[bool, str | None]:
        """(ok, new_hash): new_hash is set when the stored hash should be upgraded. `account`
        (an email key or user id) makes the work fair per account."""
        if stored_hash is None:
            await self._run(self._context.verify, password, self._dummy_hash, account=account)
            return False, None
        return await self._run(self._verify_and_update, password, stored_hash, account=account)

    def _verify_and_update(self, password: str, stored_hash: str) -> tuple[bool, str | None]:
        try:
            return self._context.verify_and_update(password, stored_hash)
        except ValueError:  # unparseable stored hash: treat as a mismatch, never a 500
            return False, None
