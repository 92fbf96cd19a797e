"""Rate-limit leases against the real Redis: exact at the limit, given back, shared fairly."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as redis

from app.errors import RateLimited
from app.identity.principal import Principal
from app.limits.bucket_keys import account_token_key
from app.limits.leases import LEASE_CALLS
from app.limits.stage import LimitsStage
from app.limits.token_buckets import Bucket
from app.proxy.pipeline import Usage
from tests.limits.conftest import make_limiter
from tests.limits.test_stage import TOKENS_PER_MIN, account, admit, chat_call

LEASE_S = 5.0  # longer than any test: retirement happens when the test says


def leasing_stage(client: redis.Redis) -> LimitsStage:
    return LimitsStage(make_limiter(client), requests_per_min=600,
                       tokens_per_min=TOKENS_PER_MIN, lease_s=LEASE_S)


async def admit_leased(stage: LimitsStage, principal: Principal) -> dict[str, str]:
    """One call admitted; lease offers it started are answered before the next."""
    call = chat_call(principal)
    await admit(stage, call)
    assert stage.leases is not None
    await stage.leases.offers_answered()
    return call.response_headers


def refill(requests_per_min: int, since_s: float) -> int:
    return int((time.monotonic() - since_s) * requests_per_min / 60) + 1


async def test_a_busy_account_is_refused_exactly_where_calls_one_by_one_would_be(
    redis_client: redis.Redis,
) -> None:
    stage = leasing_stage(redis_client)
    assert stage.leases is not None
    principal = account(requests_per_min=120, tokens_per_min=10**8)
    started = time.monotonic()
    served = 0
    with pytest.raises(RateLimited):
        while True:
            await admit_leased(stage, principal)
            served += 1
            assert served < 1_000, "never refused"
    assert stage.leases.leases_taken >= 2, "most calls were admitted on leases"
    assert 120 <= served <= 120 + refill(120, started), served


async def test_what_a_lease_still_holds_goes_back_to_the_bucket(
    redis_client: redis.Redis,
) -> None:
    stage = leasing_stage(redis_client)
    assert stage.leases is not None
    principal = account(requests_per_min=6_000, tokens_per_min=10**8)
    started = time.monotonic()
    for _ in range(3):
        await admit_leased(stage, principal)
    lease = stage.leases.open_lease(principal.account_id)
    assert lease is not None and lease.requests_left == LEASE_CALLS - 1
    await stage.retire_leases()
    await stage.drain()
    assert stage.leases.open_lease(principal.account_id) is None
    # A stage without leases reads the bucket: 3 calls and this one, nothing leased.
    plain = LimitsStage(make_limiter(redis_client), requests_per_min=600,
                        tokens_per_min=TOKENS_PER_MIN)
    call = chat_call(principal)
    await admit(plain, call)
    remaining = int(call.response_headers["X-RateLimit-Remaining"])
    assert 6_000 - 4 <= remaining <= 6_000 - 4 + refill(6_000, started), remaining


async def test_headers_count_down_one_call_at_a_time_on_a_lease(
    redis_client: redis.Redis,
) -> None:
    stage = leasing_stage(redis_client)
    principal = account(requests_per_min=10**6, tokens_per_min=10**8)
    remaining = [int((await admit_leased(stage, principal))["X-RateLimit-Remaining"])
                 for _ in range(6)]
    # A million a minute refill ~17 a millisecond: compare the leased calls only, whose
    # headers come from the lease's snapshot and count.
    leased = remaining[2:]
    assert leased == [leased[0] - index for index in range(len(leased))], remaining


async def test_two_processes_never_admit_more_than_the_limit_between_them(
    redis_client: redis.Redis,
) -> None:
    stages = [leasing_stage(redis_client), leasing_stage(redis_client)]
    principal = account(requests_per_min=100, tokens_per_min=10**8)
    started = time.monotonic()
    served, refused = 0, 0
    for index in range(400):
        try:
            await admit_leased(stages[index % 2], principal)
            served += 1
        except RateLimited:
            refused += 1
    assert refused > 0
    # Every leased request was used by the process holding it: none is lost either.
    assert 100 <= served <= 100 + refill(100, started), served


async def test_a_lease_spent_before_its_time_is_followed_by_a_larger_one(
    redis_client: redis.Redis,
) -> None:
    stage = leasing_stage(redis_client)
    assert stage.leases is not None
    principal = account(requests_per_min=10**6, tokens_per_min=10**9)
    for _ in range(2):
        await admit_leased(stage, principal)
    first = stage.leases.open_lease(principal.account_id)
    assert first is not None and first.calls_planned == LEASE_CALLS
    for _ in range(LEASE_CALLS + 1):  # the lease's calls, then one that finds it spent
        await admit_leased(stage, principal)
    second = stage.leases.open_lease(principal.account_id)
    assert first.retired and second is not None and second.calls_planned == 2 * LEASE_CALLS


async def test_calls_corrections_stay_in_the_lease_and_reach_the_bucket_with_its_rest(
    redis_client: redis.Redis,
) -> None:
    """Each settled call gives back what it did not use (or takes what it used beyond
    its estimate). On a lease that stays in memory, usable by the next calls, and the
    bucket sees the sum when the lease retires: the same level, no command per call."""
    stage = leasing_stage(redis_client)
    assert stage.leases is not None
    tokens_per_min = 10**7
    principal = account(requests_per_min=6_000, tokens_per_min=tokens_per_min)
    started = time.monotonic()
    used = [7, 11, 3, 900_000, 5]  # one call far beyond its estimate: a negative correction
    calls = []
    for tokens in used:
        call = chat_call(principal)
        await admit(stage, call)
        await stage.leases.offers_answered()
        calls.append((call, tokens))
    lease = stage.leases.open_lease(principal.account_id)
    assert lease is not None
    for call, tokens in calls:
        call.outcome.usage = Usage(prompt_tokens=tokens, completion_tokens=0)
        await stage.settle(call)
    assert not stage._pending and (stage._flusher is None or stage._flusher.done()), \
        "no correction left for Redis while the lease is open"
    await stage.retire_leases()
    await stage.drain()
    probe = Bucket(account_token_key(principal.account_id), tokens_per_min, 0)
    state = (await stage.limiter._buckets().acquire([probe])).states[0]
    refill_tokens = (time.monotonic() - started) * tokens_per_min / 60 + 1
    expected = tokens_per_min - sum(used)
    assert expected <= state.remaining_tokens <= expected + refill_tokens, state
