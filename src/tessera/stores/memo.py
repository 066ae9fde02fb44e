"""A small, bounded memo for pure functions of a value read on the hot path.

The token check decodes the same strings again and again: a client sends the same token on
every request, and Redis answers with the same session record and cached profile until one
of them changes. Decoding them (base64, JSON, HMAC) cost more than the batched Redis read
itself, so the results are remembered, keyed by the exact input. A changed value in Redis is
a different key, so a memo can never answer for data that moved on; it only saves work.

Bounded two ways: at most `limit` entries (full: it starts over, so a flood of new keys costs
at most what no memo would), and every entry is dropped `max_age` seconds after the memo was
last emptied, so what it holds of a user (a profile's email, say) leaves memory soon after the
user's data does (erasure).
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    __slots__ = ("_data", "_limit", "_max_age", "_until")

    def __init__(self, limit: int = 4096, max_age: float = 60.0) -> None:
        self._data: dict[K, V] = {}
        self._limit = limit
        self._max_age = max_age
        self._until = time.monotonic() + max_age

    def get(self, key: K) -> V | None:
        if not self._data:
            return None
        if time.monotonic() > self._until:
            self.clear()
            return None
        return self._data.get(key)

    def put(self, key: K, value: V) -> None:
        if not self._data or len(self._data) >= self._limit:
            self.clear()
        self._data[key] = value

    def clear(self) -> None:
        self._data.clear()
        self._until = time.monotonic() + self._max_age

    def __len__(self) -> int:
        return len(self._data)
