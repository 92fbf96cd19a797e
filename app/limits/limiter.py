"""The rate-limit policy: named limits in, admission or an ``ApiError`` out.

    admitted            -> ``Admission`` with the headers to send
    some bucket short   -> ``RateLimited`` (429) with ``Retry-After`` computed from
                           the buckets, naming every limit that was short
    cost above capacity -> ``InvalidRequest`` (400, ``request_too_large_for_limit``):
                           no wait can help, and a 429 would invite SDKs to retry it
    Redis unavailable   -> ``rate_limit_on_redis_error``: "closed" refuses with 503
                           ``rate_limiter_unavailable``; "open" admits without headers
                           and logs a warning at most every ``WARNING_INTERVAL_S``
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import Counter

from app.errors import InvalidRequest, RateLimited, ServiceUnavailable
from app.limits.headers import rate_limit_headers, retry_after_s
from app.limits.token_buckets import (
    Bucket,
    BucketState,
    LimiterUnavailable,
    TokenBuckets,
    Verdict,
)

log = logging.getLogger(__name__)

OnRedisError = Literal["closed", "open"]
# A Redis outage would otherwise log once per request.
WARNING_INTERVAL_S = 10.0
# What a client is told to wait when the limiter itself is down.
UNAVAILABLE_RETRY_AFTER_S = 1


@dataclass(frozen=True, slots=True)
class Limit:
    """A bucket with a name: ``label`` for metrics, ``description`` for messages."""

    label: str
    description: str
    bucket: Bucket


@dataclass(frozen=True, slots=True)
class Admission:
    """A call that passed: the bucket states and the headers that describe them."""

    requests: BucketState
    tokens: BucketState | None
    headers: dict[str, str]

    def has_room_for_another(self, tokens: int) -> bool:
        """Would another call like this one be admitted now?"""
        if self.requests.remaining_tokens < 1:
            return False
        return self.tokens is None or self.tokens.remaining_tokens >= tokens


class ThrottledWarning:
    """Logs a warning at most once per interval and counts what it kept quiet."""

    def __init__(self, interval_s: float = WARNING_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last_s: float | None = None
        self._suppressed = 0

    def warn(self, message: str) -> None:
        now_s = time.monotonic()
        if self._last_s is not None and now_s - self._last_s < self.interval_s:
            self._suppressed += 1
            return
        log.warning("%s (%d similar warnings suppressed)", message, self._suppressed)
        self._last_s = now_s
        self._suppressed = 0


class Limiter:
    """Applies limits through the token buckets and turns the verdict into HTTP terms."""

    def __init__(
        self,
        buckets: Callable[[], TokenBuckets],
        *,
        on_redis_error: OnRedisError,
        refusals: Counter,
    ) -> None:
        # A callable because the Redis client only exists once the app has started.
        self._buckets = buckets
        self.on_redis_error = on_redis_error
        self._refusals = refusals
        self._warning = ThrottledWarning()

    async def acquire(self, requests: Limit, tokens: Limit | None = None) -> Admission | None:
        """Debit every limit at once or raise; None when Redis is down and we fail open."""
        return await self.start_acquire(requests, tokens)

    def start_acquire(
        self, requests: Limit, tokens: Limit | None = None
    ) -> Coroutine[Any, Any, Admission | None]:
        """``acquire``, sent now: the coroutine (which must be awaited) gives the answer."""
        limits = (requests,) if tokens is None else (requests, tokens)
        verdict = self._buckets().start_acquire([limit.bucket for limit in limits])
        return self._decide(verdict, limits)

    async def _decide(
        self, pending: Coroutine[Any, Any, Verdict], limits: tuple[Limit, ...]
    ) -> Admission | None:
        try:
            verdict = await pending
        except LimiterUnavailable as error:
            self._unavailable(error)
            return None
        states = verdict.states
        tokens = states[1] if len(limits) == 2 else None
        headers = rate_limit_headers(states[0], tokens)
        if verdict.cost_exceeds_capacity:
            raise _too_large(limits, states, headers)
        if not verdict.admitted:
            pairs = zip(limits, states, strict=True)
            short = [(limit, state) for limit, state in pairs if state.lacking]
            for limit, _ in short:
                self._refusals.labels(limit.label).inc()
            raise _rate_limited(short, verdict.retry_after_ms, headers)
        return Admission(states[0], tokens, headers)

    async def reserve(self, buckets: list[Bucket]) -> Verdict | None:
        """Debit every bucket ahead of calls (a lease): the verdict, counted nowhere;
        None when Redis could not answer."""
        try:
            return await self._buckets().start_acquire(buckets)
        except LimiterUnavailable:
            return None

    async def adjust(self, bucket: Bucket) -> None:
        """Correct a bucket after the fact. Never raises: a lost correction only errs by
        the difference between an estimate and the truth, for one minute."""
        try:
            await self._buckets().adjust([bucket])
        except LimiterUnavailable as error:
            self._warning.warn(f"rate limit correction of {bucket.key} lost: {error}")

    def _unavailable(self, error: LimiterUnavailable) -> None:
        """Refuse with 503 when failing closed; only warn when failing open."""
        if self.on_redis_error == "open":
            self._warning.warn(f"rate limiter unavailable, letting requests through: {error}")
            return
        self._warning.warn(f"rate limiter unavailable, refusing requests: {error}")
        raise ServiceUnavailable(
            "the rate limiter is unavailable; please retry shortly",
            code="rate_limiter_unavailable",
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )


def _rate_limited(
    short: list[tuple[Limit, BucketState]], retry_after_ms: int, headers: dict[str, str]
) -> RateLimited:
    assert short, "a refusal names at least one limit"
    wait_s = retry_after_s(retry_after_ms)
    reasons = "; ".join(
        f"{limit.description}: limit {state.limit_tokens}, remaining "
        f"{max(0, state.remaining_tokens)}, requested {limit.bucket.amount_tokens}"
        for limit, state in short
    )
    return RateLimited(
        f"Rate limit reached for {reasons}. Please try again in {wait_s}s.",
        headers={**headers, "Retry-After": str(wait_s)},
    )


def _too_large(
    limits: tuple[Limit, ...], states: tuple[BucketState, ...], headers: dict[str, str]
) -> InvalidRequest:
    pairs = zip(limits, states, strict=True)
    limit, state = next(pair for pair in pairs if pair[1].cost_exceeds_capacity)
    return InvalidRequest(
        f"This request needs up to {limit.bucket.amount_tokens} against a limit of "
        f"{state.limit_tokens} {limit.description}, so it can never be admitted; "
        "lower max_tokens or shorten the prompt.",
        param="max_tokens",
        code="request_too_large_for_limit",
        headers=headers,
    )
