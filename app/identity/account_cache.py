"""A short-lived in-process cache of session-with-account rows.

Every authenticated request needs its account's status and rate-limit overrides;
reading Postgres each time would put a query on the hot path. A row is reused
for at most ``CACHE_TTL_S`` (2 s), so suspending an account or changing its
overrides takes effect within 2 s everywhere. Revocation is never decided from
this cache alone: a cached row is trusted only while the revocation feed
(``app.identity.revocation_feed``) is connected, which drops a revoked session's
row the moment Redis delivers its revocation; otherwise Redis is asked on every
request, and when Redis cannot answer the row is read fresh from Postgres.

Every drop advances ``generation``; a row loaded before a drop (a reload racing
a revocation) is not put back (``put(row, generation)``).

A row older than ``REFRESH_AFTER_S`` is still served, and the caller reloads it in
the background (``Lookup.refresh``): an account in steady use never waits for
Postgres, while no row ever serves past the TTL. Without this, a caller whose
requests are a little over 2 s apart (a streaming agent) paid a pooled Postgres
read on every other request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from app.identity.session_store import SessionAccount

CACHE_TTL_S = 2.0
REFRESH_AFTER_S = 1.0
CACHE_ENTRIES_MAX = 50_000


@dataclass(frozen=True, slots=True)
class Lookup:
    """A cached row (None on a miss) and whether the caller should reload it soon."""

    row: SessionAccount | None
    refresh: bool


MISS = Lookup(None, refresh=False)


class SessionAccountCache:
    """jti -> (loaded at, row); oldest entries go first when full."""

    def __init__(self, *, ttl_s: float = CACHE_TTL_S, refresh_after_s: float = REFRESH_AFTER_S,
                 entries_max: int = CACHE_ENTRIES_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert 0 <= refresh_after_s <= ttl_s and entries_max > 0
        self.ttl_s = ttl_s
        self.refresh_after_s = refresh_after_s
        self.entries_max = entries_max
        self.clock = clock
        self._entries: dict[str, tuple[float, SessionAccount]] = {}
        self.generation = 0

    def lookup(self, jti: str) -> Lookup:
        entry = self._entries.get(jti)
        if entry is None:
            return MISS
        loaded_s, row = entry
        age_s = self.clock() - loaded_s
        if age_s > self.ttl_s:
            del self._entries[jti]
            return MISS
        return Lookup(row, refresh=age_s > self.refresh_after_s)

    def get(self, jti: str) -> SessionAccount | None:
        return self.lookup(jti).row

    def put(self, row: SessionAccount, generation: int) -> None:
        """Cache a row read while ``generation`` was current (else it may be stale: skip)."""
        if generation != self.generation:
            return
        # Re-inserting moves the entry to the end, so insertion order is load order.
        self._entries.pop(row.jti, None)
        while len(self._entries) >= self.entries_max:
            del self._entries[next(iter(self._entries))]
        self._entries[row.jti] = (self.clock(), row)

    def drop(self, jti: str) -> None:
        self._entries.pop(jti, None)
        self.generation += 1

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)
