"""Which accounts are busy, and how large their next lease should be.

Credit leases (``app.ledger.leases``) and rate-limit leases (``app.limits.leases``)
follow one policy: an account is busy when two of its admissions by the shared
store (a hold, a bucket script) come less than a lease's time apart; its first
lease is for ``base`` calls; a lease spent before its time makes the next one
twice as large (up to ``maximum``), one that went mostly unused makes it half.
"""

from __future__ import annotations

# Accounts remembered, at most: forgetting one costs one more round trip, or a smaller
# lease, never correctness.
ACCOUNTS_MAX = 100_000


class LeaseScale:
    """Per account: when it was last admitted by the store, and its next lease's calls."""

    def __init__(self, base: int, maximum: int, window_s: float) -> None:
        assert 1 <= base <= maximum and window_s > 0
        self.base = base
        self.maximum = maximum
        self.window_s = window_s
        self._admitted_at: dict[int, float] = {}
        self._calls: dict[int, int] = {}

    def admitted(self, account_id: int, now: float) -> bool:
        """Note an admission by the store; True when the previous one was within the window."""
        previous = self._admitted_at.get(account_id)
        if previous is None and len(self._admitted_at) >= ACCOUNTS_MAX:
            self._admitted_at.clear()
            self._calls.clear()
        self._admitted_at[account_id] = now
        return previous is not None and now - previous < self.window_s

    def busy(self, account_id: int, now: float) -> None:
        """The account's lease ran out: its next admission by the store may lease again."""
        self._admitted_at[account_id] = now

    def calls(self, account_id: int) -> int:
        return self._calls.get(account_id, self.base)

    def spent_early(self, account_id: int, planned: int) -> None:
        self._set(account_id, min(2 * planned, self.maximum))

    def expired(self, account_id: int, planned: int, used: int) -> None:
        if used < planned // 2:
            self._set(account_id, max(planned // 2, self.base))

    def _set(self, account_id: int, calls: int) -> None:
        if calls == self.base:
            self._calls.pop(account_id, None)
        else:
            self._calls[account_id] = calls
