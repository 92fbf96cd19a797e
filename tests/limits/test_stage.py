"""The limits stage on chat calls: account buckets, refusals, corrections, Redis outages."""

from __future__ import annotations

import logging
import re
import secrets
import time

import pytest
import redis.asyncio as redis
from aiohttp.test_utils import make_mocked_request

from app.config.catalog import Model, Price, Provider, Route
from app.errors import InvalidRequest, RateLimited, ServiceUnavailable
from app.identity.principal import Principal
from app.limits.bucket_keys import account_request_key, account_token_key
from app.limits.headers import RATE_LIMIT_HEADERS
from app.limits.limiter import Limiter
from app.limits.stage import LimitsStage
from app.limits.token_buckets import CALL_TIMEOUT_S, Bucket
from app.proxy.chat_request import ChatRequest
from app.proxy.pipeline import ChatCall, Pipeline, Usage, estimated_max_tokens
from app.proxy.routing import Candidate
from app.storage.redis_client import create_redis
from tests.limits.conftest import MISSING_SOCKET_URL, closed_tcp_url, make_limiter

MAX_OUTPUT_TOKENS = 100
PROMPT_CHARS = 400  # 100 estimated tokens
ESTIMATE_TOKENS = 200
# Far more than a test's refill: 6000 per minute is 0.1 token per millisecond.
TOKENS_PER_MIN = 6_000


def chat_call(principal: Principal | None) -> ChatCall:
    provider = Provider(name="p", base_url="http://127.0.0.1:9/v1")
    model = Model(
        id="m", routes=(Route(provider, "m"),), price=Price(1, 1, 1),
        context_length=32_768, max_output_tokens=MAX_OUTPUT_TOKENS,
    )
    chat = ChatRequest(
        model="m", fallback_models=(), provider=None, stream=False, include_usage=False,
        max_output_tokens=None, n=1, prompt_chars=PROMPT_CHARS, forward_body={},
    )
    request = make_mocked_request("POST", "/v1/chat/completions")
    call = ChatCall("req_test", request, chat, (Candidate(model, model.routes[0]),))
    call.principal = principal
    assert estimated_max_tokens(call) == ESTIMATE_TOKENS
    return call


def account(requests_per_min: int | None = None, tokens_per_min: int | None = None
            ) -> Principal:
    return Principal(
        account_id=secrets.randbelow(2**62), chain_id=31337, wallet="0xw", smart_account="0xs",
        session_jti="jti", session_key="key",
        rate_limit_requests_per_min=requests_per_min, rate_limit_tokens_per_min=tokens_per_min,
    )


async def admit(stage: LimitsStage, call: ChatCall) -> None:
    """Admission as the pipeline runs it: a deferred verdict is awaited after the stages."""
    await Pipeline([stage]).admit(call)


def stage_for(limiter: Limiter) -> LimitsStage:
    return LimitsStage(limiter, requests_per_min=600, tokens_per_min=TOKENS_PER_MIN)


def refusals(limiter: Limiter, label: str) -> float:
    value = limiter._refusals.labels(label)._value.get()  # type: ignore[attr-defined]
    assert isinstance(value, float)
    return value


async def test_admission_debits_both_buckets_and_sets_the_headers(
    redis_client: redis.Redis,
) -> None:
    stage = stage_for(make_limiter(redis_client))
    principal = account()
    call = chat_call(principal)
    await admit(stage, call)
    headers = call.response_headers
    assert headers["X-RateLimit-Limit"] == headers["x-ratelimit-limit-requests"] == "600"
    assert headers["X-RateLimit-Remaining"] == "599"
    assert headers["X-RateLimit-Reset"] == "1"  # 100 ms until one request is back, rounded up
    assert headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MIN)
    assert headers["x-ratelimit-remaining-tokens"] == str(TOKENS_PER_MIN - ESTIMATE_TOKENS)
    assert headers["x-ratelimit-reset-tokens"] == "2s"
    assert call.http[RATE_LIMIT_HEADERS] == headers, "also published for error responses"
    stored = await redis_client.hget(account_token_key(principal.account_id), "level")
    assert stored is not None and int(stored) <= (TOKENS_PER_MIN - ESTIMATE_TOKENS + 1) * 60_000


async def test_the_requests_limit_refuses_with_429_and_a_computed_retry_after(
    redis_client: redis.Redis,
) -> None:
    limiter = make_limiter(redis_client)
    stage = stage_for(limiter)
    principal = account(requests_per_min=2)
    for _ in range(2):
        await admit(stage, chat_call(principal))
    with pytest.raises(RateLimited) as refused:
        await admit(stage, chat_call(principal))
    error = refused.value
    assert error.status == 429
    body = error.body()["error"]
    assert isinstance(body, dict)
    assert body["type"] == "rate_limit_error" and body["code"] == "rate_limit_exceeded"
    assert "requests per minute" in body["message"] and "tokens" not in body["message"]
    # Two per minute: one request comes back every 30 s.
    assert error.headers["Retry-After"] == "30"
    assert error.headers["X-RateLimit-Limit"] == "2"
    assert error.headers["X-RateLimit-Remaining"] == "0"
    assert error.headers["X-RateLimit-Reset"] == "60"
    assert re.fullmatch(r"59\.\d{1,3}s|1m0s", error.headers["x-ratelimit-reset-requests"])
    assert "x-ratelimit-remaining-tokens" in error.headers
    assert refusals(limiter, "account_requests") == 1


async def test_the_tokens_limit_refuses_and_names_tokens(redis_client: redis.Redis) -> None:
    limiter = make_limiter(redis_client)
    stage = stage_for(limiter)
    principal = account(tokens_per_min=300)
    await admit(stage, chat_call(principal))
    started_s = time.monotonic()
    with pytest.raises(RateLimited) as refused:
        await admit(stage, chat_call(principal))
    assert "tokens per minute" in refused.value.message
    assert "requested 200" in refused.value.message
    # 100 left of 300: the missing 100 take 20 s at 300 per minute.
    assert time.monotonic() - started_s < 1
    assert refused.value.headers["Retry-After"] == "20"
    assert refusals(limiter, "account_tokens") == 1
    assert refusals(limiter, "account_requests") == 0
    level = await redis_client.hget(account_request_key(principal.account_id), "level")
    assert level is not None and int(level) == 599 * 60_000, "the refused call debited nothing"


async def test_a_call_larger_than_the_tokens_limit_is_a_400(redis_client: redis.Redis) -> None:
    stage = stage_for(make_limiter(redis_client))
    principal = account(tokens_per_min=ESTIMATE_TOKENS - 1)
    with pytest.raises(InvalidRequest) as refused:
        await admit(stage, chat_call(principal))
    assert refused.value.status == 400
    assert refused.value.code == "request_too_large_for_limit"
    assert refused.value.param == "max_tokens"
    assert "Retry-After" not in refused.value.headers
    keys = (account_request_key(principal.account_id), account_token_key(principal.account_id))
    assert await redis_client.exists(*keys) == 0, "nothing was debited"


@pytest.mark.parametrize(
    ("usage", "used_tokens"),
    [
        (Usage(prompt_tokens=30, completion_tokens=20), 50),  # refund 150
        (None, 0),  # nothing produced: refund everything
        (Usage(prompt_tokens=100, completion_tokens=1_900), 2_000),  # take 1800 more
        (Usage(prompt_tokens=0, completion_tokens=10**9), 2 * TOKENS_PER_MIN),  # a wild report
    ],
)
async def test_settle_corrects_the_tokens_bucket_to_the_real_usage(
    redis_client: redis.Redis, usage: Usage | None, used_tokens: int
) -> None:
    limiter = make_limiter(redis_client)
    stage = stage_for(limiter)
    principal = account()
    call = chat_call(principal)
    started_s = time.monotonic()
    await admit(stage, call)
    call.outcome.usage = usage
    await stage.settle(call)
    await stage.drain()
    probe = Bucket(account_token_key(principal.account_id), TOKENS_PER_MIN, 0)
    state = (await limiter._buckets().acquire([probe])).states[0]
    refill_tokens = (time.monotonic() - started_s) * 1000 * TOKENS_PER_MIN / 60_000
    expected = max(-TOKENS_PER_MIN, TOKENS_PER_MIN - used_tokens)
    assert expected <= state.remaining_tokens <= min(TOKENS_PER_MIN, expected + refill_tokens + 1)


async def test_without_a_principal_no_account_limit_applies(redis_client: redis.Redis) -> None:
    stage = stage_for(make_limiter(redis_client))
    call = chat_call(None)
    await admit(stage, call)
    assert call.response_headers == {}
    assert "limits" not in call.notes
    await stage.settle(call)


async def test_redis_down_fails_closed_with_503(redis_url: str) -> None:
    for url in (closed_tcp_url(), MISSING_SOCKET_URL):
        client = create_redis(url)
        stage = stage_for(make_limiter(client, "closed"))
        with pytest.raises(ServiceUnavailable) as refused:
            await admit(stage, chat_call(account()))
        assert refused.value.status == 503
        assert refused.value.code == "rate_limiter_unavailable"
        assert refused.value.headers["Retry-After"] == "1"
        await client.aclose()


async def test_redis_down_fails_open_without_headers_and_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = create_redis(closed_tcp_url())
    stage = stage_for(make_limiter(client, "open"))
    with caplog.at_level(logging.WARNING, logger="app.limits.limiter"):
        for _ in range(5):
            call = chat_call(account())
            await admit(stage, call)
            assert call.response_headers == {}
            assert "limits" not in call.notes, "nothing debited, nothing to correct"
            call.outcome.finish("ok", PROMPT_CHARS)
            await stage.settle(call)
    warnings = [record for record in caplog.records if "rate limiter" in record.getMessage()]
    assert len(warnings) == 1, "an outage is logged once per interval, not per request"
    await client.aclose()


async def test_a_lost_correction_is_logged_not_raised(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    call = chat_call(account())
    await admit(stage_for(make_limiter(redis_client)), call)
    dead = create_redis(closed_tcp_url())
    with caplog.at_level(logging.WARNING, logger="app.limits.limiter"):
        stage = stage_for(make_limiter(dead))
        await stage.settle(call)
        await stage.drain()
    assert any("correction" in record.getMessage() for record in caplog.records)
    await dead.aclose()


@pytest.mark.parametrize("on_redis_error", ["closed", "open"])
async def test_a_silent_redis_costs_at_most_the_call_timeout(
    silent_redis_url: str, on_redis_error: str
) -> None:
    client = create_redis(silent_redis_url)
    stage = stage_for(make_limiter(client, "open" if on_redis_error == "open" else "closed"))
    call = chat_call(account())
    started_s = time.monotonic()
    if on_redis_error == "closed":
        with pytest.raises(ServiceUnavailable):
            await admit(stage, call)
    else:
        await admit(stage, call)
    assert time.monotonic() - started_s < CALL_TIMEOUT_S + 0.5
    await client.aclose()


async def test_corrections_of_many_calls_are_coalesced_and_exact(
    redis_client: redis.Redis,
) -> None:
    limiter = make_limiter(redis_client)
    sent: list[int] = []
    original = limiter.adjust

    async def counting_adjust(bucket: Bucket) -> None:
        sent.append(bucket.amount_tokens)
        await original(bucket)

    limiter.adjust = counting_adjust  # type: ignore[method-assign]
    stage = stage_for(limiter)
    principal = account()
    calls = [chat_call(principal) for _ in range(10)]
    started_s = time.monotonic()
    for call in calls:
        await admit(stage, call)
    for call in calls:
        call.outcome.usage = Usage(prompt_tokens=20, completion_tokens=10)
        await stage.settle(call)
    await stage.drain()
    assert len(sent) < len(calls), "corrections queued together went as one command"
    assert sum(sent) == 10 * (ESTIMATE_TOKENS - 30)
    probe = Bucket(account_token_key(principal.account_id), TOKENS_PER_MIN, 0)
    state = (await limiter._buckets().acquire([probe])).states[0]
    refill_tokens = (time.monotonic() - started_s) * 1000 * TOKENS_PER_MIN / 60_000
    expected = TOKENS_PER_MIN - 10 * 30
    assert expected <= state.remaining_tokens <= min(TOKENS_PER_MIN, expected + refill_tokens + 1)
