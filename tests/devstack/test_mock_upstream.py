"""The mock upstream speaks OpenAI chat completions and injects the faults asked for."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from app.devstack.mock_upstream import MockStats, start_mock_upstream

REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there, mock!"},
]
# 3 + (4 + ceil(14 / 4)) + (4 + ceil(18 / 4))
MESSAGES_PROMPT_TOKENS = 20
DEFAULT_TEXT = (
    "Mock reply from mock-gpt: Hello there, mock! "
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed"
)
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "detailed": {"type": ["boolean", "null"]},
                },
                "required": ["city", "days", "unit", "detailed"],
            },
        },
    },
]


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, base_url = await start_mock_upstream()
    try:
        yield base_url
    finally:
        await runner.cleanup()


@pytest.fixture
def root_url(mock_url: str) -> str:
    return mock_url.removesuffix("/v1")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def sdk(mock_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    # Retries would hide the faults under test, so they are off.
    client = openai.AsyncOpenAI(base_url=mock_url, api_key="x", max_retries=0)
    try:
        yield client
    finally:
        await client.close()


def chat_body(**extra: Any) -> dict[str, Any]:
    """A chat completions request for ``mock-gpt`` with ``extra`` fields merged in."""
    return {"model": "mock-gpt", "messages": MESSAGES, **extra}


def completions_url(base_url: str, options: str | None = None) -> str:
    if options is None:
        return f"{base_url}/chat/completions"
    root = base_url.removesuffix("/v1")
    return f"{root}/s/{options}/v1/chat/completions"


async def post_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.post(url, json=body) as response:
        return response.status, await response.json()


def parse_sse(raw: str) -> list[Any]:
    """The events of an SSE body: parsed JSON chunks and the final "[DONE]" string."""
    assert raw.endswith("\n\n")
    events: list[Any] = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def stream_events(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> list[Any]:
    async with session.post(url, json={**body, "stream": True}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        return parse_sse(await response.text())


def content_of(events: list[Any]) -> list[str]:
    """The content deltas, in order."""
    return [
        e["choices"][0]["delta"]["content"]
        for e in events[1:]
        if isinstance(e, dict) and e["choices"] and "content" in e["choices"][0]["delta"]
    ]


async def read_events_until_error(
    response: aiohttp.ClientResponse,
) -> tuple[list[str], BaseException | None]:
    """The ``data:`` lines read before the stream ended, and the error that ended it."""
    lines: list[str] = []
    try:
        async for line in response.content:
            if line.startswith(b"data: "):
                lines.append(line.decode().strip())
    except aiohttp.ClientPayloadError as error:
        return lines, error
    return lines, None


async def get_stats(session: aiohttp.ClientSession, root_url: str) -> dict[str, Any]:
    async with session.get(f"{root_url}/mock/stats") as response:
        assert response.status == 200
        return await response.json()


async def wait_for(
    session: aiohttp.ClientSession, root_url: str, query: str
) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{root_url}/mock/wait?{query}") as response:
        return response.status, await response.json()


# --- Non-streaming -------------------------------------------------------------------


async def test_chat_completion_shape_and_usage(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    status, body = await post_json(session, completions_url(mock_url), chat_body())

    assert status == 200
    assert body["id"] == "chatcmpl-mock-1"
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "mock-gpt"
    assert body["system_fingerprint"] == "fp_mock"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": DEFAULT_TEXT},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": MESSAGES_PROMPT_TOKENS,
        "completion_tokens": 16,
        "total_tokens": MESSAGES_PROMPT_TOKENS + 16,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def test_completion_ids_are_unique_per_answer(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    url = completions_url(mock_url)
    ids = [(await post_json(session, url, chat_body()))[1]["id"] for _ in range(2)]

    assert ids == ["chatcmpl-mock-1", "chatcmpl-mock-2"]


async def test_prompt_tokens_count_text_parts_and_images(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "abcd"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "efghi"},
            ],
        },
        {"role": "assistant", "content": None},
    ]
    status, body = await post_json(
        session, completions_url(mock_url), {"model": "m", "messages": messages}
    )

    assert status == 200
    # 3 + (4 + ceil(9 / 4) + 85) + (4 + 0)
    assert body["usage"]["prompt_tokens"] == 99
    assert body["choices"][0]["message"]["content"].startswith("Mock reply from m: abcdefghi ")


async def test_openai_sdk_reads_usage_details(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="mock-gpt-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_body={"mock": {"words": 4, "cached_tokens": 7, "reasoning_tokens": 3}},
    )

    assert completion.choices[0].message.content == "Mock reply from mock-gpt-mini:"
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    # Reasoning tokens are part of completion_tokens, as OpenAI counts them.
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (20, 7, 27)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 7
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 3


async def test_explicit_text_is_returned_verbatim(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    text = "  Hi  there,\nfriend "
    _, body = await post_json(session, completions_url(mock_url), chat_body(mock={"text": text}))
    events = await stream_events(
        session, completions_url(mock_url), chat_body(mock={"text": text, "chunks": 2})
    )

    assert body["choices"][0]["message"]["content"] == text
    assert body["usage"]["completion_tokens"] == 3
    assert content_of(events) == ["  Hi  there,\n", "friend "]


async def test_max_tokens_caps_with_finish_reason_length(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    url = completions_url(mock_url)
    _, capped = await post_json(session, url, chat_body(max_tokens=5))
    _, newer_field_wins = await post_json(
        session, url, chat_body(max_tokens=5, max_completion_tokens=3)
    )
    _, within = await post_json(session, url, chat_body(max_tokens=16))
    _, text_capped = await post_json(
        session, url, chat_body(max_tokens=2, mock={"text": "one two three"})
    )
    events = await stream_events(session, url, chat_body(max_tokens=2))

    assert capped["choices"][0]["message"]["content"] == "Mock reply from mock-gpt: Hello"
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 5
    assert newer_field_wins["usage"]["completion_tokens"] == 3
    assert within["choices"][0]["finish_reason"] == "stop"
    assert text_capped["choices"][0]["message"]["content"] == "one two"
    assert text_capped["choices"][0]["finish_reason"] == "length"
    assert content_of(events) == ["Mock ", "reply"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


# --- Streaming -----------------------------------------------------------------------


async def test_streaming_event_order_with_usage(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    events = await stream_events(
        session, completions_url(mock_url), chat_body(stream_options={"include_usage": True})
    )

    chunks, done = events[:-1], events[-1]
    assert done == "[DONE]"
    assert len(chunks) == 1 + 8 + 1 + 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(content_of(events)) == DEFAULT_TEXT
    assert [len(piece.split()) for piece in content_of(events)] == [2] * 8
    assert chunks[-2]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 16
    assert chunks[-1]["usage"]["prompt_tokens"] == MESSAGES_PROMPT_TOKENS
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    for chunk in chunks:
        assert chunk["id"] == "chatcmpl-mock-1"
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "mock-gpt"
        assert chunk["system_fingerprint"] == "fp_mock"
        assert isinstance(chunk["created"], int)


async def test_streaming_without_include_usage_has_no_usage(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    events = await stream_events(session, completions_url(mock_url), chat_body())

    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in event for event in events[:-1])
    assert all(event["choices"] for event in events[:-1])


async def test_each_event_is_its_own_http_chunk(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True}, mock={"chunks": 4})
    http_chunks: list[bytes] = []
    pending = b""
    async with session.post(completions_url(mock_url), json=body) as response:
        async for data, end_of_http_chunk in response.content.iter_chunks():
            pending += data
            if end_of_http_chunk:
                http_chunks.append(pending)
                pending = b""

    # role, 4 contents, finish, usage, [DONE]: one chunked-encoding frame (one write) each.
    assert len(http_chunks) == 8
    assert all(c.startswith(b"data: ") and c.count(b"\n\n") == 1 for c in http_chunks)
    assert http_chunks[-1] == b"data: [DONE]\n\n"


async def test_stream_spreads_words_evenly_and_matches_non_streaming(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    mock = {"words": 12, "chunks": 5}
    url = completions_url(mock_url)
    events = await stream_events(session, url, chat_body(mock=mock))
    _, body = await post_json(session, url, chat_body(mock=mock))

    pieces = content_of(events)
    assert [len(piece.split()) for piece in pieces] == [3, 3, 2, 2, 2]
    assert "".join(pieces) == body["choices"][0]["message"]["content"]


async def test_stream_makes_one_word_per_chunk_at_least(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    events = await stream_events(
        session,
        completions_url(mock_url),
        chat_body(stream_options={"include_usage": True}, mock={"words": 3, "chunks": 6}),
    )

    assert len(content_of(events)) == 6
    assert events[-2]["usage"]["completion_tokens"] == 6


async def test_openai_sdk_streaming(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="mock-gpt",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_TEXT
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == MESSAGES_PROMPT_TOKENS + 16


# --- Tool calls ----------------------------------------------------------------------


async def test_tool_call_to_the_named_tool_with_schema_arguments(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    _, body = await post_json(
        session, completions_url(mock_url), chat_body(tools=WEATHER_TOOLS, tool_choice=choice)
    )

    arguments = '{"city":"mock","days":1,"unit":"celsius","detailed":true}'
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_mock_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": arguments},
            }
        ],
    }
    assert body["usage"]["completion_tokens"] == math.ceil(len(arguments) / 4) + 5


async def test_tool_choice_defaults_to_first_tool_and_none_disables(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    url = completions_url(mock_url)
    _, auto = await post_json(session, url, chat_body(tools=WEATHER_TOOLS))
    _, none = await post_json(session, url, chat_body(tools=WEATHER_TOOLS, tool_choice="none"))
    _, forbidden = await post_json(
        session, url, chat_body(tools=WEATHER_TOOLS, mock={"tool_calls": False})
    )

    call = auto["choices"][0]["message"]["tool_calls"][0]
    assert call["function"] == {"name": "search", "arguments": '{"query":"mock"}'}
    assert auto["usage"]["completion_tokens"] == math.ceil(16 / 4) + 5
    assert none["choices"][0]["message"]["content"] == DEFAULT_TEXT
    assert none["choices"][0]["finish_reason"] == "stop"
    assert forbidden["choices"][0]["finish_reason"] == "stop"


async def test_forced_tool_call_without_tools(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    _, body = await post_json(session, completions_url(mock_url, "tool_calls=true"), chat_body())

    call = body["choices"][0]["message"]["tool_calls"][0]
    assert call["function"] == {"name": "mock_tool", "arguments": '{"query":"mock"}'}
    assert body["choices"][0]["finish_reason"] == "tool_calls"


async def test_streamed_tool_call_with_sdk(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="mock-gpt",
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=WEATHER_TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mock": {"chunks": 4}},
    )
    chunks = [chunk async for chunk in stream]

    first = chunks[0].choices[0].delta
    assert first.role == "assistant"
    assert first.tool_calls is not None
    header = first.tool_calls[0]
    assert (header.index, header.id, header.type) == (0, "call_mock_1", "function")
    assert header.function is not None
    assert (header.function.name, header.function.arguments) == ("get_weather", "")
    fragments = [
        c.choices[0].delta.tool_calls[0].function.arguments  # type: ignore[index,union-attr]
        for c in chunks[1:]
        if c.choices and c.choices[0].delta.tool_calls
    ]
    assert len(fragments) == 4
    assert json.loads("".join(fragments)) == {
        "city": "mock",
        "days": 1,
        "unit": "celsius",
        "detailed": True,
    }
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == math.ceil(len("".join(fragments)) / 4) + 5


# --- Faults --------------------------------------------------------------------------


async def test_status_fault_429_carries_retry_after(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    url = completions_url(mock_url)
    async with session.post(url, json=chat_body(mock={"fault": "status", "status": 429})) as r:
        default_status, default_retry = r.status, r.headers.get("Retry-After")
        error = (await r.json())["error"]
    explicit = chat_body(mock={"fault": "status", "status": 429, "retry_after": 7})
    async with session.post(url, json=explicit) as r:
        explicit_retry = r.headers.get("Retry-After")

    assert (default_status, default_retry, explicit_retry) == (429, "1", "7")
    assert error["type"] == "requests"
    assert error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    assert error["message"]


async def test_status_fault_defaults_to_500_and_custom_message(
    session: aiohttp.ClientSession, mock_url: str, sdk: openai.AsyncOpenAI
) -> None:
    status, body = await post_json(
        session,
        completions_url(mock_url),
        chat_body(mock={"fault": "status", "error_message": "boom"}),
    )
    with pytest.raises(openai.RateLimitError) as raised:
        await sdk.chat.completions.create(
            model="mock-gpt",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_body={"mock": {"fault": "status", "status": 429}},
        )

    assert status == 500
    assert body == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
    }
    assert raised.value.status_code == 429
    assert raised.value.response.headers["retry-after"] == "1"


async def test_drop_fault_closes_without_a_response(
    session: aiohttp.ClientSession, mock_url: str, root_url: str
) -> None:
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with session.post(completions_url(mock_url, "fault=drop"), json=chat_body()) as r:
            await r.read()

    stats = await get_stats(session, root_url)
    assert (stats["requests"], stats["faulted"], stats["completed"]) == (1, 1, 0)
    assert stats["cancelled"] == 0


async def test_cut_fault_ends_stream_without_done(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True}, mock={"fault": "cut"})
    async with session.post(completions_url(mock_url), json=body) as response:
        assert response.status == 200
        lines, error = await read_events_until_error(response)

    assert isinstance(error, aiohttp.ClientPayloadError)
    assert len(lines) == 1 + 2
    assert '"role":"assistant"' in lines[0]
    assert all("[DONE]" not in line and 'finish_reason":"' not in line for line in lines)


async def test_cut_after_zero_sends_only_the_role_chunk(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    url = completions_url(mock_url, "fault=cut,cut_after=0")
    async with session.post(url, json=chat_body(stream=True)) as response:
        lines, error = await read_events_until_error(response)

    assert isinstance(error, aiohttp.ClientPayloadError)
    assert len(lines) == 1


async def test_cut_fault_truncates_non_streaming_body(
    session: aiohttp.ClientSession, mock_url: str, root_url: str
) -> None:
    async with session.post(completions_url(mock_url, "fault=cut"), json=chat_body()) as r:
        assert r.status == 200
        assert r.content_length is not None
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()

    stats = await get_stats(session, root_url)
    assert (stats["faulted"], stats["completed"]) == (1, 0)


async def test_no_usage_fault_omits_usage(session: aiohttp.ClientSession, mock_url: str) -> None:
    url = completions_url(mock_url, "fault=no_usage")
    events = await stream_events(session, url, chat_body(stream_options={"include_usage": True}))
    _, body = await post_json(session, url, chat_body())

    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(event["usage"] is None for event in events[:-1])
    assert "usage" not in body
    assert body["choices"][0]["message"]["content"] == DEFAULT_TEXT


async def test_hang_fault_client_timeout_counts_a_cancellation(
    session: aiohttp.ClientSession, mock_url: str, root_url: str
) -> None:
    timeout = aiohttp.ClientTimeout(total=0.2)
    with pytest.raises(TimeoutError):
        async with session.post(
            completions_url(mock_url, "fault=hang"), json=chat_body(), timeout=timeout
        ) as response:
            await response.read()

    status, stats = await wait_for(session, root_url, "cancelled=1&timeout_s=5")
    assert status == 200
    assert (stats["cancelled"], stats["active"], stats["completed"]) == (1, 0, 0)


async def test_wait_sees_a_hanging_request_arrive_and_its_client_leave(
    session: aiohttp.ClientSession, mock_url: str, root_url: str
) -> None:
    async def hanging_call() -> None:
        async with session.post(completions_url(mock_url, "fault=hang"), json=chat_body()):
            pass

    call = asyncio.create_task(hanging_call())
    arrived_status, arrived = await wait_for(session, root_url, "active=1&faulted=1")
    call.cancel()
    left_status, left = await wait_for(session, root_url, "cancelled=1")

    assert (arrived_status, arrived["active"], arrived["faulted"]) == (200, 1, 1)
    assert (left_status, left["active"], left["cancelled"]) == (200, 0, 1)
    assert call.cancelled()


async def test_client_leaving_mid_stream_counts_a_cancellation(
    session: aiohttp.ClientSession, mock_url: str, root_url: str
) -> None:
    # The long delay keeps the handler parked between chunks when the client leaves.
    body = chat_body(stream=True, mock={"chunk_delay_ms": 60_000})
    async with session.post(completions_url(mock_url), json=body) as response:
        first = await response.content.readuntil(b"\n\n")
        second = await response.content.readuntil(b"\n\n")
        response.close()

    status, stats = await wait_for(session, root_url, "cancelled=1")
    assert b'"role":"assistant"' in first
    assert b'"content":"Mock reply "' in second
    assert status == 200
    assert (stats["cancelled"], stats["completed"], stats["active"]) == (1, 0, 0)


async def test_latency_delays_the_headers(session: aiohttp.ClientSession, mock_url: str) -> None:
    started = time.monotonic()
    status, _ = await post_json(session, completions_url(mock_url, "latency_ms=60"), chat_body())

    assert status == 200
    assert time.monotonic() - started >= 0.05


# --- Options -------------------------------------------------------------------------


async def test_route_options_override_body_options(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    failing = chat_body(mock={"fault": "status", "status": 500, "words": 3})
    status_503, _ = await post_json(session, completions_url(mock_url, "status=503"), failing)
    status_ok, body = await post_json(
        session, completions_url(mock_url, "fault=none,words=5"), failing
    )

    assert status_503 == 503
    assert status_ok == 200
    assert body["usage"]["completion_tokens"] == 5


async def test_malformed_json_is_a_400_in_openai_shape(
    session: aiohttp.ClientSession, mock_url: str
) -> None:
    async with session.post(
        completions_url(mock_url), data=b"{not json", headers={"Content-Type": "application/json"}
    ) as response:
        status, body = response.status, await response.json()

    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    assert body["error"]["code"] is None


@pytest.mark.parametrize(
    ("options", "mock"),
    [
        ("nonsense=1", None),
        ("words=many", None),
        ("fault=explode", None),
        ("chunks=0", None),
        ("novalue", None),
        (None, {"words": True}),
        (None, "fast"),
    ],
)
async def test_invalid_mock_options_are_refused(
    session: aiohttp.ClientSession, mock_url: str, options: str | None, mock: object
) -> None:
    body = chat_body() if mock is None else chat_body(mock=mock)
    status, answer = await post_json(session, completions_url(mock_url, options), body)

    assert status == 400
    assert answer["error"]["param"] == "mock"


# --- Models and control endpoints ----------------------------------------------------


async def test_models_list(
    session: aiohttp.ClientSession, root_url: str, sdk: openai.AsyncOpenAI
) -> None:
    page = await sdk.models.list()
    async with session.get(f"{root_url}/s/fault=drop/v1/models") as response:
        routed = await response.json()

    assert [model.id for model in page.data] == ["mock-gpt", "mock-gpt-mini"]
    assert routed["object"] == "list"
    assert all(model["object"] == "model" for model in routed["data"])


async def test_stats_record_the_request_and_reset_zeroes_them(
    session: aiohttp.ClientSession, mock_url: str, root_url: str
) -> None:
    headers = {"Authorization": "Bearer sk-upstream", "X-Request-Id": "req-42"}
    async with session.post(completions_url(mock_url), json=chat_body(), headers=headers) as r:
        assert r.status == 200

    stats = await get_stats(session, root_url)
    async with session.post(f"{root_url}/mock/reset") as response:
        assert response.status == 200
    after_reset = await get_stats(session, root_url)

    assert (stats["requests"], stats["completed"], stats["active"]) == (1, 1, 0)
    assert stats["last_request"] == chat_body()
    assert stats["last_headers"]["authorization"] == "Bearer sk-upstream"
    assert stats["last_headers"]["x-request-id"] == "req-42"
    assert after_reset == {
        "requests": 0,
        "completed": 0,
        "cancelled": 0,
        "faulted": 0,
        "active": 0,
        "last_request": None,
        "last_headers": {},
    }


async def test_missing_authorization_is_recorded_as_null(
    session: aiohttp.ClientSession, mock_url: str, root_url: str
) -> None:
    await post_json(session, completions_url(mock_url), chat_body())

    stats = await get_stats(session, root_url)
    assert stats["last_headers"]["authorization"] is None
    assert "x-request-id" not in stats["last_headers"]


async def test_wait_times_out_with_408(session: aiohttp.ClientSession, root_url: str) -> None:
    status, stats = await wait_for(session, root_url, "completed=1&timeout_s=0.05")

    assert status == 408
    assert stats["completed"] == 0


async def test_wait_returns_once_the_condition_holds(
    session: aiohttp.ClientSession, mock_url: str, root_url: str
) -> None:
    waiting = asyncio.create_task(wait_for(session, root_url, "completed=2&requests=2"))
    for _ in range(2):
        await post_json(session, completions_url(mock_url), chat_body())

    status, stats = await waiting
    assert status == 200
    assert (stats["completed"], stats["requests"]) == (2, 2)


async def test_wait_refuses_unknown_conditions(
    session: aiohttp.ClientSession, root_url: str
) -> None:
    status, body = await wait_for(session, root_url, "finished=1")

    assert status == 400
    assert "finished" in body["error"]["message"]


async def test_stats_waiters_wake_on_change() -> None:
    stats = MockStats()
    waiting = asyncio.create_task(stats.wait_for({"cancelled": 1}, 5))
    # One turn of the loop lets the waiter check the counters and park on the event.
    await asyncio.sleep(0)
    parked = not waiting.done()
    stats.cancelled += 1
    stats.changed()

    assert parked
    assert await waiting is True


# --- Standalone process --------------------------------------------------------------


async def test_run_mock_upstream_prints_its_url_and_stops_on_sigterm() -> None:
    code = (
        "from app.devstack.mock_upstream import run_mock_upstream\n"
        "run_mock_upstream('127.0.0.1', 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, env=env, cwd=REPO_ROOT
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        match = re.fullmatch(r"mock upstream listening on (http://127\.0\.0\.1:(\d+)/v1)\n", line)
        assert match is not None, line
        assert int(match.group(2)) > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{match.group(1)}/models") as response,
        ):
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert await process.stdout.read() == b""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
