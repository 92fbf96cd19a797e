"""Installs the limits concern: the per-IP middleware, the header hook, the account stage.

    bucket_keys.py     Redis keys (with Cluster hash tags) and IP grouping
    token_bucket.lua   the atomic acquire/adjust script; its header is the contract
    token_buckets.py   the script bound to a Redis client; Redis errors translated once
    limiter.py         policy: verdicts into 429/400/503, fail open or closed, metrics
    headers.py         X-RateLimit-* and x-ratelimit-*-requests/-tokens, Retry-After
    stage.py           the pipeline stage: per-account requests and tokens per minute
    leases.py          a busy account's calls admitted on tokens taken ahead
    ip_limit.py        the middleware: per-IP requests on unauthenticated endpoints
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import Counter

from app.http.keys import METRICS, REDIS, REDIS_BATCHER, SETTINGS
from app.limits.headers import add_rate_limit_headers
from app.limits.ip_limit import ip_limit_middleware
from app.limits.limiter import Limiter
from app.limits.stage import LimitsStage
from app.limits.token_buckets import TokenBuckets
from app.proxy.pipeline import Stage


def setup_limits(app: web.Application) -> Stage:
    settings = app[SETTINGS]
    refusals = Counter(
        "tollgate_rate_limited", "Requests refused by a rate limit, by the limit that was short.",
        ["limit"], registry=app[METRICS].registry,
    )
    limiter = Limiter(
        _AppBuckets(app), on_redis_error=settings.rate_limit_on_redis_error, refusals=refusals
    )
    # Innermost middleware: its refusals are rendered by the error middleware like any other.
    app.middlewares.append(
        ip_limit_middleware(limiter, requests_per_min=settings.rate_limit_ip_requests_per_min)
    )
    app.on_response_prepare.append(add_rate_limit_headers)
    stage = LimitsStage(
        limiter,
        requests_per_min=settings.rate_limit_requests_per_min,
        tokens_per_min=settings.rate_limit_tokens_per_min,
        lease_s=settings.rate_limit_lease_s,
        on_lease=lambda: app[METRICS].lease_taken("rate_limit"),
    )

    async def drain_corrections(app: web.Application) -> None:
        await stage.retire_leases()
        await stage.drain()

    app.on_shutdown.append(drain_corrections)
    return stage


class _AppBuckets:
    """The token buckets of the app's Redis client, which exists only after startup."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._buckets: TokenBuckets | None = None

    def __call__(self) -> TokenBuckets:
        client = self._app[REDIS]
        if self._buckets is None or self._buckets.client is not client:
            self._buckets = TokenBuckets(client, batcher=self._app[REDIS_BATCHER])
        return self._buckets
