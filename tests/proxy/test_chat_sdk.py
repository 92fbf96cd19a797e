"""The official OpenAI SDK against a running Tollgate, forwarding to the mock process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import openai
import pytest

from tests.conftest import RunningTollgate

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
async def client(tollgate: RunningTollgate, session_token: str
                 ) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=tollgate.v1, api_key=session_token, max_retries=0
    ) as client:
        yield client


async def test_non_streaming_completion(client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="test-model", messages=HELLO
    )
    completion = raw.parse()
    assert completion.model == "test-model"
    assert completion.id == raw.headers["x-request-id"]
    assert raw.headers["x-tollgate-provider"] == "mock"
    assert completion.provider == "mock"  # type: ignore[attr-defined]
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content.startswith("Mock reply from mock-gpt")
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens > 0


async def test_streaming_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="test-model", messages=HELLO, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {chunk.model for chunk in chunks} == {"test-model"}
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Mock reply from mock-gpt")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


async def test_streaming_without_usage_hides_it(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="test-model", messages=HELLO,
                                                  stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks, "stream produced chunks"
    assert all(chunk.choices for chunk in chunks), "no usage-only chunk was asked for"
    assert all(getattr(chunk, "usage", None) is None for chunk in chunks)


TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}]


async def test_tool_calls_non_streaming(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="test-model", messages=HELLO, tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)


async def test_tool_calls_streaming_and_tool_message_roundtrip(
    client: openai.AsyncOpenAI,
) -> None:
    stream = await client.chat.completions.create(
        model="test-model", messages=HELLO, tools=TOOLS, stream=True,  # type: ignore[arg-type]
    )
    name = ""
    arguments = ""
    call_id = None
    async for chunk in stream:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call_id = call_id or delta_call.id
            name += delta_call.function.name or "" if delta_call.function else ""
            arguments += delta_call.function.arguments or "" if delta_call.function else ""
    assert name == "get_weather"
    assert json.loads(arguments)["city"]
    # The tool's answer goes back in a tool message, which must be accepted.
    follow_up = await client.chat.completions.create(
        model="test-model",
        messages=[
            *HELLO,
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
        ],
        tool_choice="none", tools=TOOLS,  # type: ignore[arg-type]
    )
    assert follow_up.choices[0].finish_reason == "stop"


async def test_sdk_exception_classes(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="test-model", messages=HELLO,
                                             temperature=5)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.APIStatusError) as too_large:
        await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "x" * 300_000}]
        )
    assert too_large.value.status_code == 413
    with pytest.raises(openai.InternalServerError) as down:
        await client.chat.completions.create(model="down-model", messages=HELLO)
    assert down.value.status_code == 502
    with pytest.raises(openai.InternalServerError) as slow:
        await client.chat.completions.create(model="timeout-model", messages=HELLO)
    assert slow.value.status_code == 504


async def test_many_parallel_streams(client: openai.AsyncOpenAI) -> None:
    async def one(index: int) -> str:
        stream = await client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": f"stream {index}"}],
            stream=True,
            extra_body={"mock": {"chunks": 16, "chunk_delay_ms": 5}},
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one(i) for i in range(64)))
    for index, text in enumerate(texts):
        assert f"stream {index}" in text, "each stream got its own answer, in full"
