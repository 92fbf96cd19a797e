"""Rate-limit response headers, in both conventions clients read.

    X-RateLimit-Limit       requests per minute of the bucket that limits requests
    X-RateLimit-Remaining   whole requests left now (never negative)
    X-RateLimit-Reset       seconds until that bucket is full again, an integer
                            rounded up (a delta, not a Unix time, like Retry-After)

and OpenAI's, for requests and, where a tokens bucket applies, for tokens:

    x-ratelimit-limit-requests      x-ratelimit-limit-tokens
    x-ratelimit-remaining-requests  x-ratelimit-remaining-tokens
    x-ratelimit-reset-requests      x-ratelimit-reset-tokens    ("1s", "6m0s", "120ms")

A refusal adds ``Retry-After``: whole seconds, rounded up, at least 1.
"""

from __future__ import annotations

import math

from aiohttp import web

from app.limits.token_buckets import BucketState

MS_PER_S = 1000
MS_PER_MIN = 60 * MS_PER_S
MS_PER_H = 60 * MS_PER_MIN


def rate_limit_headers(requests: BucketState, tokens: BucketState | None = None) -> dict[str, str]:
    """The headers describing the requests bucket and, if given, the tokens bucket."""
    headers = {
        "X-RateLimit-Limit": str(requests.limit_tokens),
        "X-RateLimit-Remaining": str(max(0, requests.remaining_tokens)),
        "X-RateLimit-Reset": str(math.ceil(requests.reset_ms / MS_PER_S)),
    }
    headers.update(_openai_headers("requests", requests))
    if tokens is not None:
        headers.update(_openai_headers("tokens", tokens))
    return headers


def _openai_headers(kind: str, state: BucketState) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(state.limit_tokens),
        f"x-ratelimit-remaining-{kind}": str(max(0, state.remaining_tokens)),
        f"x-ratelimit-reset-{kind}": openai_duration(state.reset_ms),
    }


def retry_after_s(retry_ms: int) -> int:
    """``Retry-After`` in whole seconds: rounded up so a client that obeys is admitted."""
    assert retry_ms >= 0
    return max(1, math.ceil(retry_ms / MS_PER_S))


def openai_duration(duration_ms: int) -> str:
    """A duration as OpenAI writes it (Go's format at millisecond precision).

    Below a second in milliseconds ("120ms"), else hours, minutes and seconds with
    trailing zeros of the fraction dropped ("1s", "1.5s", "6m0s", "1h0m0s").
    """
    assert duration_ms >= 0
    if duration_ms == 0:
        return "0s"
    if duration_ms < MS_PER_S:
        return f"{duration_ms}ms"
    hours, rest_ms = divmod(duration_ms, MS_PER_H)
    minutes, rest_ms = divmod(rest_ms, MS_PER_MIN)
    seconds, millis = divmod(rest_ms, MS_PER_S)
    text = f"{seconds}.{millis:03d}".rstrip("0") + "s" if millis else f"{seconds}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


RATE_LIMIT_HEADERS = web.RequestKey("rate_limit_headers", dict[str, str])


def publish_headers(request: web.Request, headers: dict[str, str]) -> None:
    """Make ``headers`` go out on whatever answers this request, error pages included."""
    request[RATE_LIMIT_HEADERS] = headers


async def add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: reaches streamed responses and errors raised after admission."""
    headers = request.get(RATE_LIMIT_HEADERS)
    if headers:
        response.headers.update(headers)
