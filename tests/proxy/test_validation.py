"""Bad input gets a clear OpenAI-shaped error naming the parameter, never a crash."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import MockUpstream, RunningTollgate

OK_MESSAGES = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "test-model", "messages": OK_MESSAGES, **fields}


CASES: list[tuple[str, Any, int, str | None]] = [
    ("not an object", [1, 2], 400, None),
    ("missing model", {"messages": OK_MESSAGES}, 400, "model"),
    ("model wrong type", {"model": 5, "messages": OK_MESSAGES}, 400, "model"),
    ("missing messages", {"model": "test-model"}, 400, "messages"),
    ("empty messages", body(messages=[]), 400, "messages"),
    ("messages not a list", body(messages="hi"), 400, "messages"),
    ("bad role", body(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
    ("content wrong type", body(messages=[{"role": "user", "content": 7}]), 400,
     "messages[0].content"),
    ("tool without id", body(messages=[{"role": "tool", "content": "x"}]), 400,
     "messages[0].tool_call_id"),
    ("assistant null content", body(messages=[{"role": "assistant", "content": None}]), 400,
     "messages[0]"),
    ("bad part type", body(messages=[{"role": "user", "content": [{"type": "video"}]}]), 400,
     "messages[0].content[0].type"),
    ("temperature high", body(temperature=2.5), 400, "temperature"),
    ("temperature string", body(temperature="hot"), 400, "temperature"),
    ("top_p", body(top_p=1.5), 400, "top_p"),
    ("frequency_penalty", body(frequency_penalty=-3), 400, "frequency_penalty"),
    ("presence_penalty", body(presence_penalty=2.1), 400, "presence_penalty"),
    ("top_k", body(top_k=0), 400, "top_k"),
    ("n too big", body(n=100), 400, "n"),
    ("max_tokens zero", body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens float", body(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens over model", {"model": "small-model", "messages": OK_MESSAGES,
                               "max_tokens": 101}, 400, "max_tokens"),
    ("max_completion_tokens over model", {"model": "small-model", "messages": OK_MESSAGES,
                                          "max_completion_tokens": 500}, 400,
     "max_completion_tokens"),
    ("five stops", body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop wrong type", body(stop=5), 400, "stop"),
    ("top_logprobs range", body(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top_logprobs without logprobs", body(top_logprobs=2), 400, "top_logprobs"),
    ("response_format", body(response_format={"type": "xml"}), 400, "response_format.type"),
    ("json_schema without name", body(response_format={"type": "json_schema",
                                                       "json_schema": {}}), 400,
     "response_format.json_schema.name"),
    ("tool_choice unknown", body(tool_choice="sometimes"), 400, "tool_choice"),
    ("tool_choice without tools", body(tool_choice="required"), 400, "tool_choice"),
    ("named tool missing", body(tools=[{"type": "function", "function": {"name": "a"}}],
                                tool_choice={"type": "function", "function": {"name": "b"}}),
     400, "tool_choice"),
    ("bad tool name", body(tools=[{"type": "function", "function": {"name": "a b"}}]), 400,
     "tools[0].function.name"),
    ("stream wrong type", body(stream="yes"), 400, "stream"),
    ("stream_options without stream", body(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("seed wrong type", body(seed="x"), 400, "seed"),
    ("metadata values", body(metadata={"a": 1}), 400, "metadata.a"),
    ("provider unknown key", body(provider={"sort": "price"}), 400, "provider.sort"),
    ("too many messages", body(messages=OK_MESSAGES * 65), 400, "messages"),
    ("unknown model", body(model="gpt-nothing"), 404, "model"),
    ("unknown fallback model", body(models=["nope"]), 404, "models"),
    ("pinned provider without route", body(model="down/test-model"), 404, "model"),
    ("model of a provider without key", body(model="unset-model"), 404, "model"),
    ("preferences exclude everything", body(provider={"only": ["nobody"]}), 400, "provider"),
]


@pytest.mark.parametrize(("name", "payload", "status", "param"), CASES,
                         ids=[case[0] for case in CASES])
async def test_bad_requests(
    http: aiohttp.ClientSession, tollgate: RunningTollgate,
    name: str, payload: Any, status: int, param: str | None,
) -> None:
    async with http.post(f"{tollgate.v1}/chat/completions", json=payload) as response:
        assert response.status == status
        document = orjson.loads(await response.read())
    error = document["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"null", b'"text"', b"[]"])
async def test_malformed_bodies(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, raw: bytes
) -> None:
    async with http.post(f"{tollgate.v1}/chat/completions", data=raw,
                         headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_oversized_body_is_413(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    payload = orjson.dumps(body(messages=[{"role": "user", "content": "x" * 400_000}]))
    async with http.post(f"{tollgate.v1}/chat/completions", data=payload) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"


async def test_unknown_fields_pass_through_untouched(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, mock_upstream: MockUpstream
) -> None:
    extra = {"vendor_option": {"nested": [1, 2, 3]}, "reasoning_effort": "low"}
    message = {"role": "user", "content": "hi", "name": "alice", "custom": True}
    payload = {"model": "test-model", "messages": [message], "provider": {"only": ["mock-b"]},
               **extra}
    async with http.post(f"{tollgate.v1}/chat/completions", json=payload) as response:
        assert response.status == 200
    async with http.get(f"{mock_upstream.root}/mock/stats") as response:
        stats = await response.json()
    forwarded = stats["last_request"]
    assert forwarded["vendor_option"] == extra["vendor_option"]
    assert forwarded["reasoning_effort"] == "low"
    assert forwarded["messages"] == [message]
    assert forwarded["model"] == "mock-gpt", "the upstream gets its own model id"
    assert "provider" not in forwarded and "models" not in forwarded
    assert stats["last_headers"]["authorization"] is None, "mock-b has no key"


@pytest.mark.parametrize("path", ["/v1/nothing", "/v2/chat/completions"])
async def test_unknown_url_is_404_in_openai_shape(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, path: str
) -> None:
    async with http.get(f"{tollgate.url}{path}") as response:
        assert response.status == 404
        assert (await response.json())["error"]["type"] == "not_found_error"


async def test_wrong_method_is_405(http: aiohttp.ClientSession,
                                   tollgate: RunningTollgate) -> None:
    async with http.get(f"{tollgate.v1}/chat/completions") as response:
        assert response.status == 405
        assert "POST" in response.headers["Allow"]
        assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_oversized_header_is_refused(http: aiohttp.ClientSession,
                                           tollgate: RunningTollgate) -> None:
    async with http.get(f"{tollgate.url}/health/live",
                        headers={"X-Huge": "a" * 20_000}) as response:
        assert response.status in (400, 431)


async def test_request_ids(http: aiohttp.ClientSession, tollgate: RunningTollgate) -> None:
    async with http.post(f"{tollgate.v1}/chat/completions", json=body(),
                         headers={"X-Client-Request-Id": "my-trace-42"}) as response:
        assert response.status == 200
        request_id = response.headers["X-Request-Id"]
        assert response.headers["X-Client-Request-Id"] == "my-trace-42"
        assert (await response.json())["id"] == request_id
    async with http.post(f"{tollgate.v1}/chat/completions", json=body()) as response:
        assert response.headers["X-Request-Id"] != request_id, "ids are unique"
    async with http.post(f"{tollgate.v1}/chat/completions", json={},
                         headers={"X-Client-Request-Id": "bad id with spaces"}) as response:
        assert response.status == 400
        assert response.headers["X-Request-Id"].startswith("req_")
        assert "X-Client-Request-Id" not in response.headers


async def test_credentials_are_checked_before_the_body(tollgate: RunningTollgate) -> None:
    async with aiohttp.ClientSession() as anonymous, anonymous.post(
        f"{tollgate.v1}/chat/completions", data=b"{not json"
    ) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "missing_token"
