"""The bucket script against the real Redis: exactness, all-or-nothing, waits, corrections."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from app.limits.token_buckets import Bucket, TokenBuckets

# A period so long that refill during a test is far below one token.
FROZEN_PERIOD_MS = 10**9


def elapsed_ms(start_s: float) -> float:
    return (time.monotonic() - start_s) * 1000


def admitted_bound(capacity: int, period_ms: int, elapsed: float) -> int:
    """The most a bucket may ever admit in ``elapsed`` ms: its capacity plus the refill."""
    return capacity + math.floor(capacity * elapsed / period_ms)


@pytest.mark.parametrize("period_ms", [FROZEN_PERIOD_MS, 60_000])
async def test_concurrent_acquires_never_exceed_capacity_plus_refill(
    buckets: TokenBuckets, owner: str, period_ms: int
) -> None:
    key = f"tg:rl:{{{owner}}}:req"
    started_s = time.monotonic()
    verdicts = await asyncio.gather(
        *(buckets.acquire([Bucket(key, 50, 1, period_ms)]) for _ in range(200))
    )
    bound = admitted_bound(50, period_ms, elapsed_ms(started_s))
    admitted = sum(verdict.admitted for verdict in verdicts)
    assert 50 <= admitted <= bound
    if period_ms == FROZEN_PERIOD_MS:
        assert admitted == 50


async def test_a_refusal_debits_no_bucket(buckets: TokenBuckets, owner: str) -> None:
    requests = f"tg:rl:{{{owner}}}:req"
    tokens = f"tg:rl:{{{owner}}}:tok"
    drained = await buckets.acquire([Bucket(tokens, 10, 10, FROZEN_PERIOD_MS)])
    assert drained.admitted and drained.states[0].remaining_tokens == 0

    verdict = await buckets.acquire(
        [Bucket(requests, 10, 3, FROZEN_PERIOD_MS), Bucket(tokens, 10, 1, FROZEN_PERIOD_MS)]
    )
    assert not verdict.admitted
    assert [state.lacking for state in verdict.states] == [False, True]
    assert verdict.states[0].remaining_tokens == 10, "the request bucket kept its tokens"
    assert await buckets.client.exists(requests) == 0, "a full bucket is no key at all"


async def test_retry_after_is_the_time_until_the_cost_is_back(
    buckets: TokenBuckets, owner: str
) -> None:
    # 60 tokens per minute: one token per 1000 ms.
    key = f"tg:rl:{{{owner}}}:tok"
    started_s = time.monotonic()
    drained = await buckets.acquire([Bucket(key, 60, 60)])
    assert drained.admitted
    assert drained.states[0].remaining_tokens == 0
    assert drained.states[0].reset_ms == 60_000, "empty: a whole period until full"

    verdict = await buckets.acquire([Bucket(key, 60, 10)])
    waited = elapsed_ms(started_s)
    assert not verdict.admitted
    # Ten tokens take 10 000 ms to come back, less what refilled since the drain.
    assert 10_000 - waited - 1 <= verdict.retry_after_ms <= 10_000
    assert 60_000 - waited - 1 <= verdict.states[0].reset_ms <= 60_000


async def test_retry_after_is_the_longest_wait_of_the_short_buckets(
    buckets: TokenBuckets, owner: str
) -> None:
    fast, slow = f"tg:rl:{{{owner}}}:fast", f"tg:rl:{{{owner}}}:slow"
    await buckets.acquire([Bucket(fast, 60, 60), Bucket(slow, 6, 6)])
    verdict = await buckets.acquire([Bucket(fast, 60, 1), Bucket(slow, 6, 1)])
    fast_state, slow_state = verdict.states
    assert 0 < fast_state.retry_ms <= 1_000
    assert 9_000 < slow_state.retry_ms <= 10_000
    assert verdict.retry_after_ms == slow_state.retry_ms


async def test_a_request_is_admitted_as_soon_as_the_bucket_reports_enough(
    buckets: TokenBuckets, owner: str
) -> None:
    # One token per millisecond: the wait is short enough to observe without sleeping.
    key = f"tg:rl:{{{owner}}}:tok"
    await buckets.acquire([Bucket(key, 60_000, 60_000)])
    refused = await buckets.acquire([Bucket(key, 60_000, 30)])
    assert not refused.admitted
    assert 1 <= refused.retry_after_ms <= 30

    deadline_s = time.monotonic() + 2.0
    while True:
        probe = await buckets.acquire([Bucket(key, 60_000, 0)])  # costs nothing
        if probe.states[0].remaining_tokens >= 30:
            break
        assert time.monotonic() < deadline_s, "the bucket never refilled"
    assert (await buckets.acquire([Bucket(key, 60_000, 30)])).admitted


async def test_a_cost_above_capacity_is_refused_for_good(
    buckets: TokenBuckets, owner: str
) -> None:
    requests, tokens = f"tg:rl:{{{owner}}}:req", f"tg:rl:{{{owner}}}:tok"
    verdict = await buckets.acquire([Bucket(requests, 10, 1), Bucket(tokens, 100, 101)])
    assert not verdict.admitted
    assert verdict.cost_exceeds_capacity
    assert verdict.states[1].retry_ms == -1
    with pytest.raises(AssertionError):
        _ = verdict.retry_after_ms
    assert await buckets.client.exists(requests, tokens) == 0, "nothing was debited"


async def test_adjust_refunds_up_to_capacity_and_overdraws_down_to_minus_capacity(
    buckets: TokenBuckets, owner: str
) -> None:
    key = f"tg:rl:{{{owner}}}:tok"

    def bucket(amount: int) -> Bucket:
        return Bucket(key, 100, amount, FROZEN_PERIOD_MS)

    assert (await buckets.acquire([bucket(60)])).states[0].remaining_tokens == 40
    assert (await buckets.adjust([bucket(25)]))[0].remaining_tokens == 65
    assert (await buckets.adjust([bucket(1_000)]))[0].remaining_tokens == 100
    assert await buckets.client.exists(key) == 0, "a refund never fills beyond capacity"

    assert (await buckets.adjust([bucket(-160)]))[0].remaining_tokens == -60
    refused = await buckets.acquire([bucket(1)])
    assert not refused.admitted, "a debt delays later requests"
    # 61 tokens must come back, at 100 per period.
    expected_ms = math.ceil(61 * FROZEN_PERIOD_MS / 100)
    assert expected_ms - 1_000 <= refused.retry_after_ms <= expected_ms
    assert (await buckets.adjust([bucket(-10**6)]))[0].remaining_tokens == -100


async def test_partial_buckets_expire_when_they_would_be_full_again(
    buckets: TokenBuckets, owner: str
) -> None:
    key = f"tg:rl:{{{owner}}}:req"
    verdict = await buckets.acquire([Bucket(key, 60, 6)])  # 6 s to refill
    ttl_ms = await buckets.client.pttl(key)
    assert verdict.states[0].reset_ms - 50 <= ttl_ms <= verdict.states[0].reset_ms
    assert 5_900 <= ttl_ms <= 6_000
    stored = await buckets.client.hgetall(key)
    # Sub-token precision: one token is period_ms ticks, the level is an exact integer.
    level_ticks = int(stored[b"level"])
    assert 54 * 60_000 <= level_ticks < 55 * 60_000
    await buckets.adjust([Bucket(key, 60, 6)])
    assert await buckets.client.exists(key) == 0


async def test_keys_of_one_call_must_share_a_hash_tag(buckets: TokenBuckets) -> None:
    with pytest.raises(AssertionError, match="hash slots"):
        await buckets.acquire([Bucket("tg:rl:{a}:req", 1, 1), Bucket("tg:rl:{b}:tok", 1, 1)])

