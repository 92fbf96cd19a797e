"""Through a real Tollgate: the per-IP limit of unauthenticated endpoints, headers, metrics."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as redis

from app.config.catalog import Catalog
from app.http.app import Backends
from app.http.keys import PIPELINE, REDIS_BATCHER
from app.identity.sessions import SESSIONS
from app.limits.bucket_keys import ip_request_key
from app.limits.stage import LimitsStage
from tests.conftest import RunningTollgate, make_settings, start_tollgate
from tests.identity.test_tokens import chat
from tests.identity.wallets import authorize, bearer

IP_LIMIT = 3
RATE_LIMIT_HEADERS = (
    "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
)


@pytest.fixture
async def limited_tollgate(
    catalog: Catalog, backends: Backends, redis_client: redis.Redis
) -> AsyncIterator[RunningTollgate]:
    # Every test client is 127.0.0.1: start from a full bucket and leave one behind.
    key = ip_request_key("127.0.0.1")
    await redis_client.delete(key)
    settings = make_settings(rate_limit_ip_requests_per_min=IP_LIMIT)
    running = await start_tollgate(settings, catalog, backends)
    yield running
    await running.runner.cleanup()
    await redis_client.delete(key)


async def test_unauthenticated_endpoints_share_one_ip_limit(
    http: aiohttp.ClientSession, limited_tollgate: RunningTollgate
) -> None:
    base = limited_tollgate.v1
    # The routes may not exist yet: the limit holds by path, before and after routing.
    calls = [
        ("GET", f"{base}/authorize/schema"),
        ("GET", f"{base}/authorize/check"),
        ("POST", f"{base}/authorize"),
    ]
    for position, (method, url) in enumerate(calls):
        async with http.request(method, url) as response:
            assert response.status != 429
            assert response.headers["X-RateLimit-Limit"] == str(IP_LIMIT)
            assert response.headers["X-RateLimit-Remaining"] == str(IP_LIMIT - 1 - position)
            assert all(name in response.headers for name in RATE_LIMIT_HEADERS)

    async with http.get(f"{base}/authorize/schema") as response:
        assert response.status == 429
        body = await response.json()
        headers = response.headers
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "IP address" in body["error"]["message"]
    # Three per minute: one request is back 20 s after the first was taken.
    assert 1 <= int(headers["Retry-After"]) <= 20
    assert headers["X-RateLimit-Remaining"] == "0"
    assert headers["X-RateLimit-Reset"] == "60"
    assert all(name in headers for name in RATE_LIMIT_HEADERS)
    assert "x-ratelimit-limit-tokens" not in headers
    assert "X-Request-Id" in headers

    async with http.get(f"{limited_tollgate.url}/metrics") as response:
        exposition = await response.text()
    assert 'tollgate_rate_limited_total{limit="ip_requests"} 1.0' in exposition


async def test_other_endpoints_are_not_ip_limited(
    http: aiohttp.ClientSession, limited_tollgate: RunningTollgate
) -> None:
    for _ in range(IP_LIMIT + 1):
        async with http.get(f"{limited_tollgate.v1}/models") as response:
            assert response.status == 200
            assert "X-RateLimit-Limit" not in response.headers
        async with http.delete(f"{limited_tollgate.v1}/authorize") as response:
            assert response.status != 429
            assert "X-RateLimit-Limit" not in response.headers


async def test_a_busy_session_is_admitted_without_a_redis_round_trip(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    """The first call is checked in full; the second asks the buckets (the revocation feed
    spares the session read) and, the account being busy, leases tokens for the next
    calls; those are admitted in memory, and their corrections stay in the lease."""
    feed = tollgate.app[SESSIONS].feed
    assert feed is not None
    await feed.wait_live()
    issued = await authorize(http, tollgate.url)
    (stage,) = [stage for stage in tollgate.app[PIPELINE].stages if stage.name == "limits"]
    assert isinstance(stage, LimitsStage) and stage.leases is not None
    batcher = tollgate.app[REDIS_BATCHER]
    remaining = []
    for call in range(6):
        before = batcher.pipelines_sent
        status, body, headers = await chat(http, tollgate, bearer(issued["token"]))
        assert status == 200, body
        remaining.append(int(headers["X-RateLimit-Remaining"]))
        await stage.leases.offers_answered()
        await stage.drain()
        sent = batcher.pipelines_sent - before
        if call == 1:
            # Its bucket script, the lease and its correction (grouped into round trips
            # as the batcher finds them): the lease is open after it.
            row = tollgate.app[SESSIONS].cache.get(issued["sessionId"])
            assert row is not None and stage.leases.open_lease(row.account.id) is not None
        if call >= 2:
            # Nothing (at most a session check, had the revocation feed been
            # reconnecting): the lease admitted it and keeps its correction.
            assert sent <= 1, f"call {call}: {sent} round trips"
            lease = stage.leases.open_lease(row.account.id)
            assert lease is not None and lease.requests_left == 16 - (call - 1)
    row = tollgate.app[SESSIONS].cache.get(issued["sessionId"])
    assert row is not None
    lease = stage.leases.open_lease(row.account.id)
    # Open unless a slow run outlived it (5 s), when it gave its rest back.
    assert lease is None or lease.requests_left == 16 - 4
    # Each call's header shows one request fewer (the buckets refill 10 a second, so a
    # slow run may show a step of 0).
    steps = [a - b for a, b in itertools.pairwise(remaining)]
    assert all(step in (0, 1) for step in steps) and sum(steps) >= 3, remaining

