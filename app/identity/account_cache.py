"""A short-lived in-process cache of session-with-account rows.

Every authenticated request needs its account's status and rate-limit overrides;
reading Postgres each time would put a query on the hot path. A row is reused
for at most ``CACHE_TTL_S`` (2 s), so suspending an account or changing its
overrides takes effect within 2 s everywhere. Revocation is never decided from
this cache alone: Redis is asked on every request, and when Redis cannot answer
the row is read fresh from Postgres.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.identity.session_store import SessionAccount

CACHE_TTL_S = 2.0
CACHE_ENTRIES_MAX = 50_000


class SessionAccountCache:
    """jti -> (loaded at, row); oldest entries go first when full."""

    def __init__(self, *, ttl_s: float = CACHE_TTL_S, entries_max: int = CACHE_ENTRIES_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert ttl_s >= 0 and entries_max > 0
        self.ttl_s = ttl_s
        self.entries_max = entries_max
        self.clock = clock
        self._entries: dict[str, tuple[float, SessionAccount]] = {}

    def get(self, jti: str) -> SessionAccount | None:
        entry = self._entries.get(jti)
        if entry is None:
            return None
        loaded_s, row = entry
        if self.clock() - loaded_s > self.ttl_s:
            del self._entries[jti]
            return None
        return row

    def put(self, row: SessionAccount) -> None:
        # Re-inserting moves the entry to the end, so insertion order is load order.
        self._entries.pop(row.jti, None)
        while len(self._entries) >= self.entries_max:
            del self._entries[next(iter(self._entries))]
        self._entries[row.jti] = (self.clock(), row)

    def __len__(self) -> int:
        return len(self._entries)
