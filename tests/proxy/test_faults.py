"""Fallback across routes and every fault the mock upstream can play."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from app.config.catalog import Catalog
from app.http.app import Backends
from tests.conftest import (
    SECRET_PROVIDER_KEY,
    MockUpstream,
    RunningTollgate,
    make_settings,
    start_tollgate,
)

HELLO = [{"role": "user", "content": "Hello"}]


async def post(http: aiohttp.ClientSession, tollgate: RunningTollgate, body: dict[str, Any]
               ) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.post(f"{tollgate.v1}/chat/completions", json=body) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


def sse_events(raw: bytes) -> list[Any]:
    events = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


async def metric(http: aiohttp.ClientSession, tollgate: RunningTollgate, prefix: str) -> float:
    async with http.get(f"{tollgate.url}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


@pytest.mark.parametrize("stream", [False, True])
async def test_fallback_past_every_retryable_failure(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, stream: bool
) -> None:
    before = await metric(http, tollgate, 'tollgate_upstream_errors_total{kind="server_error"'
                          ',provider="down"}')
    status, headers, raw = await post(
        http, tollgate, {"model": "fallback-model", "messages": HELLO, "stream": stream}
    )
    assert status == 200
    assert headers["X-Tollgate-Provider"] == "mock-b"
    if stream:
        events = sse_events(raw)
        assert events[-1] == "[DONE]"
        assert all(event["provider"] == "mock-b" for event in events[:-1])
    else:
        assert orjson.loads(raw)["provider"] == "mock-b"
    after = await metric(http, tollgate, 'tollgate_upstream_errors_total{kind="server_error"'
                         ',provider="down"}')
    assert after == before + 1


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("down-model", 502, "upstream_error"),
        ("limited-model", 502, "upstream_rate_limited"),
        ("timeout-model", 504, "upstream_timeout"),
        ("badkey-model", 502, "upstream_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_failures_map_to_gateway_statuses(
    http: aiohttp.ClientSession, tollgate: RunningTollgate,
    model: str, status: int, code: str, stream: bool,
) -> None:
    got, headers, raw = await post(http, tollgate,
                                   {"model": model, "messages": HELLO, "stream": stream})
    assert got == status
    error = orjson.loads(raw)["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    assert headers["X-Request-Id"].startswith("req_"), headers


async def test_non_retryable_rejection_does_not_fall_back(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    status, _, raw = await post(http, tollgate, {"model": "rejects-model", "messages": HELLO})
    assert status == 400, "a 400 from the upstream is the caller's problem: no fallback"
    assert orjson.loads(raw)["error"]["code"] == "upstream_rejected"


async def test_timeout_falls_back(http: aiohttp.ClientSession, tollgate: RunningTollgate) -> None:
    status, headers, _ = await post(
        http, tollgate, {"model": "timeout-fallback-model", "messages": HELLO}
    )
    assert status == 200
    assert headers["X-Tollgate-Provider"] == "mock"


async def test_server_timing_says_where_the_time_went(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    """The slow route's 0.3 s first-byte timeout is spent upstream, not in our stages."""
    status, headers, _ = await post(
        http, tollgate, {"model": "timeout-fallback-model", "messages": HELLO}
    )
    assert status == 200
    steps = dict(part.split(";dur=") for part in headers["Server-Timing"].split(", "))
    assert {"auth", "parse", "upstream", "settle"} <= set(steps), steps
    assert float(steps["upstream"]) >= 300.0
    assert all(float(ms) < 300.0 for name, ms in steps.items() if name != "upstream")

    status, headers, _ = await post(
        http, tollgate, {"model": "timeout-fallback-model", "messages": HELLO, "stream": True}
    )
    assert status == 200
    steps = dict(part.split(";dur=") for part in headers["Server-Timing"].split(", "))
    assert float(steps["upstream"]) >= 300.0, "a stream's header says how long to its first event"


async def test_cut_before_response_falls_back_but_cut_mid_stream_reports_in_stream(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    status, headers, _ = await post(http, tollgate, {"model": "cut-model", "messages": HELLO})
    assert status == 200, "a non-streaming body cut short never reached the client: fall back"
    assert headers["X-Tollgate-Provider"] == "mock"

    status, headers, raw = await post(
        http, tollgate, {"model": "cut-model", "messages": HELLO, "stream": True}
    )
    assert status == 200
    assert headers["X-Tollgate-Provider"] == "cutter", "bytes were sent: no fallback"
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "upstream_error"
    content = [e for e in events[:-2] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(content) == 2


async def test_stalled_stream_reports_a_timeout_in_stream(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    status, _, raw = await post(http, tollgate, {
        "model": "stall-model", "messages": HELLO, "stream": True,
    })
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "upstream_timeout"


async def test_stream_without_upstream_usage_gets_an_estimate(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    status, _, raw = await post(http, tollgate, {
        "model": "nousage-model", "messages": HELLO, "stream": True,
        "stream_options": {"include_usage": True},
    })
    assert status == 200
    usage = sse_events(raw)[-2]["usage"]
    assert usage["estimated"] is True
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0

    status, _, raw = await post(http, tollgate, {"model": "nousage-model", "messages": HELLO})
    usage = orjson.loads(raw)["usage"]
    assert usage["estimated"] is True and usage["completion_tokens"] > 0


async def test_upstream_secrets_are_sanitized(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, mock_upstream: MockUpstream
) -> None:
    leak = (f"invalid key {SECRET_PROVIDER_KEY}; also sk-other-123456789 "
            "at https://admin:hunter2@internal.example/v1?api_key=abc123")
    status, _, raw = await post(http, tollgate, {
        "model": "test-model", "messages": HELLO, "provider": {"only": ["mock"]},
        "mock": {"fault": "status", "status": 500, "error_message": leak},
    })
    assert status == 502
    text = raw.decode()
    for secret in (SECRET_PROVIDER_KEY, "sk-other-123456789", "hunter2", "abc123"):
        assert secret not in text
    assert "invalid key" in text
    # The key did reach the provider, as a bearer token.
    async with http.get(f"{mock_upstream.root}/mock/stats") as response:
        stats = await response.json()
    assert stats["last_headers"]["authorization"] == f"Bearer {SECRET_PROVIDER_KEY}"


async def test_drop_falls_back_and_hang_times_out(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    status, _headers, _ = await post(http, tollgate, {
        "model": "test-model", "messages": HELLO, "mock": {"fault": "drop"},
    })
    assert status == 502, "every route dropped the connection"
    status, _, _raw = await post(http, tollgate, {
        "model": "timeout-model", "messages": HELLO, "mock": {"fault": "hang"},
    })
    assert status == 504


async def test_client_disconnect_cancels_the_upstream(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, mock_upstream: MockUpstream,
    caplog: pytest.LogCaptureFixture, auth_headers: dict[str, str],
) -> None:
    async with http.get(f"{mock_upstream.root}/mock/stats") as response:
        cancelled_before = (await response.json())["cancelled"]
    cancelled_calls = 'tollgate_requests_total{model="test-model",provider="mock",' \
                      'status="cancelled",streamed="true"}'
    calls_before = await metric(http, tollgate, cancelled_calls)
    body = {"model": "test-model", "messages": HELLO, "stream": True,
            "provider": {"only": ["mock"]},
            "mock": {"chunks": 200, "chunk_delay_ms": 50}}
    async with aiohttp.ClientSession(headers=auth_headers) as own:
        response = await own.post(f"{tollgate.v1}/chat/completions", json=body)
        first = await response.content.readuntil(b"\n\n")
        assert b'"role":"assistant"' in first
        response.close()  # the client goes away mid-stream
    async with http.get(f"{mock_upstream.root}/mock/wait",
                        params={"cancelled": cancelled_before + 1, "timeout_s": 5}) as waited:
        assert waited.status == 200, "the upstream saw its request cancelled"
    # The outcome is kept: the call was settled as cancelled.
    for _ in range(200):
        if await metric(http, tollgate, cancelled_calls) == calls_before + 1:
            break
        await asyncio.sleep(0.01)  # polling a metric; the condition itself is asserted below
    assert await metric(http, tollgate, cancelled_calls) == calls_before + 1
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a disconnect is no fault"


async def test_keepalive_comments_while_upstream_is_silent(
    http: aiohttp.ClientSession, catalog: Catalog, backends: Backends
) -> None:
    quick = await start_tollgate(make_settings(stream_keepalive_s=0.05), catalog, backends)
    try:
        status, _, raw = await post(http, quick, {
            "model": "test-model", "messages": HELLO, "stream": True,
            "mock": {"chunks": 3, "chunk_delay_ms": 400},
        })
    finally:
        await quick.runner.cleanup()
    assert status == 200
    assert b": keep-alive\n\n" in raw
    assert sse_events(raw)[-1] == "[DONE]"


async def test_chunks_are_relayed_as_they_arrive(
    tollgate: RunningTollgate, auth_headers: dict[str, str],
) -> None:
    """Each chunk reaches the client on its own: the upstream spaces them 300 ms apart."""
    body = {"model": "test-model", "messages": HELLO, "stream": True,
            "mock": {"chunks": 4, "chunk_delay_ms": 300}}
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    async with aiohttp.ClientSession(headers=auth_headers) as own, own.post(
        f"{tollgate.v1}/chat/completions", json=body
    ) as response:
        while True:
            event = await response.content.readuntil(b"\n\n")
            if b'"content":"' in event and b'"content":""' not in event:
                arrivals.append(loop.time())
            if event.startswith(b"data: [DONE]"):
                break
    assert len(arrivals) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    # Batching would deliver several chunks at once (gap ~0); a relay keeps the spacing.
    assert min(gaps) > 0.15
