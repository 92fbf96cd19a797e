"""Rate-limit headers: values, units and OpenAI's duration format."""

from __future__ import annotations

import pytest

from app.limits.headers import openai_duration, rate_limit_headers, retry_after_s
from app.limits.token_buckets import BucketState


@pytest.mark.parametrize(
    ("duration_ms", "text"),
    [
        (0, "0s"),
        (1, "1ms"),
        (120, "120ms"),
        (999, "999ms"),
        (1_000, "1s"),
        (1_500, "1.5s"),
        (17_280, "17.28s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (61_010, "1m1.01s"),
        (3_600_000, "1h0m0s"),
        (3_723_400, "1h2m3.4s"),
    ],
)
def test_openai_duration(duration_ms: int, text: str) -> None:
    assert openai_duration(duration_ms) == text


@pytest.mark.parametrize(
    ("retry_ms", "seconds"), [(0, 1), (1, 1), (999, 1), (1_000, 1), (1_001, 2), (59_500, 60)]
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(
    retry_ms: int, seconds: int
) -> None:
    assert retry_after_s(retry_ms) == seconds


def test_headers_describe_the_requests_and_tokens_buckets() -> None:
    requests = BucketState(limit_tokens=600, remaining_tokens=599, reset_ms=100, retry_ms=0)
    tokens = BucketState(limit_tokens=90_000, remaining_tokens=-5, reset_ms=61_500, retry_ms=0)
    assert rate_limit_headers(requests, tokens) == {
        "X-RateLimit-Limit": "600",
        "X-RateLimit-Remaining": "599",
        "X-RateLimit-Reset": "1",  # seconds until full, rounded up
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "599",
        "x-ratelimit-reset-requests": "100ms",
        "x-ratelimit-limit-tokens": "90000",
        "x-ratelimit-remaining-tokens": "0",  # a debt shows as nothing left
        "x-ratelimit-reset-tokens": "1m1.5s",
    }


def test_headers_without_a_tokens_bucket_and_a_full_bucket() -> None:
    full = BucketState(limit_tokens=120, remaining_tokens=120, reset_ms=0, retry_ms=0)
    headers = rate_limit_headers(full)
    assert headers["X-RateLimit-Reset"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "0s"
    assert not any(name.endswith("-tokens") for name in headers)
