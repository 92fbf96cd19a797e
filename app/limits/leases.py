"""Rate-limit leases: a busy account's calls are admitted on tokens this process took ahead.

Asking Redis for every call costs a round trip (and a wake-up of Redis) before
the answer can leave. A busy account instead has its buckets debited for a few
calls at once (a lease: ``n`` requests and ``n`` times the call's token
estimate, by the same atomic script); its next calls here are admitted from the
lease in memory, until it is spent or ``lease_s`` has passed. Then what is left
is given back to the buckets (a correction, as after any call).

Why the limits still hold: Redis debited everything a lease can admit before it
admitted any of it, so the buckets never go below what per-call debits would have
left. What a lease costs: tokens leased here and not yet used are unavailable to
the account's calls in other processes for at most ``lease_s``, so another
process may refuse a call a little early. To keep that small, a lease is taken
only when the account is busy here (its previous admission from Redis was less
than ``lease_s`` ago) and takes at most ``1 / LEASE_SHARE`` of what each bucket
has left, for ``LEASE_CALLS`` calls at first (more for an account that spends its
leases early); near its limit an account is
admitted call by call as before, so its refusals come exactly when they did.

Headers of a call admitted on a lease describe the buckets as Redis left them
after the lease, plus what the lease still holds: the remaining count falls by
one per call as a client expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from app.limits.headers import rate_limit_headers
from app.limits.limiter import Admission, Limit, Limiter
from app.limits.token_buckets import Bucket, BucketState
from app.proxy.lease_scale import LeaseScale

log = logging.getLogger(__name__)

# At most this many calls per lease (at first; an account that spends its lease
# before its time gets one twice as large next, up to the maximum, and one that used
# less than half gets half)...
LEASE_CALLS = 16
LEASE_CALLS_MAX = 1024
# ...at most this share of what each bucket has left (1/4)...
LEASE_SHARE = 4
# ...and only if that makes a lease of at least this many calls.
LEASE_CALLS_MIN = 2


@dataclass(slots=True, eq=False)
class RateLease:
    """Requests and tokens one account's buckets were debited for ahead of its calls."""

    account_id: int
    requests: Bucket  # keys and capacities; amounts are what was leased
    tokens: Bucket
    requests_left: int
    tokens_left: int
    # The buckets as Redis left them right after the lease's debit.
    requests_state: BucketState
    tokens_state: BucketState
    admits_until: float
    retired: bool = False

    @property
    def calls_planned(self) -> int:
        return self.requests.amount_tokens

    def fits(self, requests: Limit, tokens: Limit, now: float) -> bool:
        return (not self.retired and now < self.admits_until
                and requests.bucket.key == self.requests.key
                and requests.bucket.capacity_tokens == self.requests.capacity_tokens
                and tokens.bucket.capacity_tokens == self.tokens.capacity_tokens
                and self.requests_left >= 1
                and self.tokens_left >= tokens.bucket.amount_tokens)

    def headers(self) -> dict[str, str]:
        # Built field by field: dataclasses.replace costs microseconds, on every leased call.
        requests, tokens = self.requests_state, self.tokens_state
        return rate_limit_headers(
            BucketState(requests.limit_tokens, requests.remaining_tokens + self.requests_left,
                        requests.reset_ms, requests.retry_ms),
            BucketState(tokens.limit_tokens, tokens.remaining_tokens + self.tokens_left,
                        tokens.reset_ms, tokens.retry_ms),
        )


class RateLeases:
    """This process's rate-limit leases, one per account at most."""

    def __init__(self, limiter: Limiter, give_back: Callable[[Bucket], None],
                 lease_s: float, on_taken: Callable[[], None] = lambda: None) -> None:
        assert lease_s > 0
        self.on_taken = on_taken
        self.limiter = limiter
        # Queues a correction for a bucket (the stage's coalescing corrections).
        self.give_back = give_back
        self.lease_s = lease_s
        self._open: dict[int, RateLease] = {}
        self._taking: dict[int, asyncio.Task[None]] = {}
        # Busy accounts (admitted by Redis less than lease_s apart) and their leases' sizes.
        self.scale = LeaseScale(LEASE_CALLS, LEASE_CALLS_MAX, lease_s)
        self.leases_taken = 0

    def use(self, account_id: int, requests: Limit, tokens: Limit) -> dict[str, str] | None:
        """Admit a call on the account's lease: its headers, or None (ask Redis)."""
        lease = self._open.get(account_id)
        if lease is None:
            return None
        now = asyncio.get_running_loop().time()
        if not lease.fits(requests, tokens, now):
            if now < lease.admits_until and not lease.retired:
                # Spent before its time: the next one is larger.
                self.scale.spent_early(account_id, lease.calls_planned)
            self._retire(lease)
            # Spent (or stale) while busy: the next admission from Redis may lease again.
            self.scale.busy(account_id, now)
            return None
        lease.requests_left -= 1
        lease.tokens_left -= tokens.bucket.amount_tokens
        return lease.headers()

    def absorb(self, account_id: int, tokens: Bucket, correction_tokens: int) -> bool:
        """Keep a settled call's tokens correction in the account's lease, if it has one
        on that bucket: its next calls here may use it, and the lease gives the sum back
        when it retires. One Redis command per lease instead of one per flush of calls'
        corrections. False: no such lease, the caller sends the correction itself."""
        lease = self._open.get(account_id)
        if (lease is None or lease.retired or lease.tokens.key != tokens.key
                or lease.tokens.capacity_tokens != tokens.capacity_tokens):
            return False
        lease.tokens_left += correction_tokens
        return True

    def offer(self, account_id: int, requests: Limit, tokens: Limit,
              admission: Admission) -> None:
        """A call was admitted by Redis: lease for the account's next calls if it is busy."""
        busy = self.scale.admitted(account_id, asyncio.get_running_loop().time())
        if (not busy or account_id in self._open or account_id in self._taking
                or admission.tokens is None):
            return
        per_call = max(tokens.bucket.amount_tokens, 1)
        calls = min(self.scale.calls(account_id),
                    admission.requests.remaining_tokens // LEASE_SHARE,
                    admission.tokens.remaining_tokens // (LEASE_SHARE * per_call))
        if calls < LEASE_CALLS_MIN:
            return
        lease_requests = replace(requests.bucket, amount_tokens=calls)
        lease_tokens = replace(tokens.bucket, amount_tokens=calls * per_call)
        task = asyncio.ensure_future(self._take(account_id, lease_requests, lease_tokens))
        self._taking[account_id] = task
        task.add_done_callback(lambda _: self._taking.pop(account_id, None))

    async def _take(self, account_id: int, requests: Bucket, tokens: Bucket) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        verdict = await self.limiter.reserve([requests, tokens])
        if verdict is None or not verdict.admitted:
            return  # Redis is down, or the room went to other calls meanwhile.
        lease = RateLease(
            account_id, requests, tokens, requests.amount_tokens, tokens.amount_tokens,
            verdict.states[0], verdict.states[1], admits_until=started + self.lease_s,
        )
        self.leases_taken += 1
        self.on_taken()
        previous = self._open.get(account_id)
        if previous is not None:
            self._retire(previous)
        self._open[account_id] = lease
        loop.call_at(lease.admits_until, self._expire, lease)

    def _expire(self, lease: RateLease) -> None:
        """The lease's time is up: retire it, and lease less next time if it was not used."""
        if not lease.retired:
            self.scale.expired(lease.account_id, lease.calls_planned,
                               lease.calls_planned - lease.requests_left)
        self._retire(lease)

    def _retire(self, lease: RateLease) -> None:
        """No more calls on the lease; what it still holds goes back to the buckets."""
        if lease.retired:
            return
        lease.retired = True
        if self._open.get(lease.account_id) is lease:
            del self._open[lease.account_id]
        if lease.requests_left > 0:
            self.give_back(replace(lease.requests, amount_tokens=lease.requests_left))
        if lease.tokens_left != 0:
            # Negative after calls that used more than their estimate (``absorb``): the
            # bucket is debited the difference.
            self.give_back(replace(lease.tokens, amount_tokens=lease.tokens_left))
        lease.requests_left = lease.tokens_left = 0

    def open_lease(self, account_id: int) -> RateLease | None:
        return self._open.get(account_id)

    async def offers_answered(self) -> None:
        """Wait until every lease being taken is taken or refused."""
        await asyncio.gather(*self._taking.values(), return_exceptions=True)

    async def retire_all(self) -> None:
        """Give every lease's rest back (at shutdown, before corrections are drained)."""
        for task in list(self._taking.values()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for lease in list(self._open.values()):
            self._retire(lease)
