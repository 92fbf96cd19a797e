"""A deterministic OpenAI-compatible upstream for tests, benchmarks and the dev stack.

The mock speaks the chat completions protocol (JSON and SSE streaming) and plays
"the provider" wherever a real one is not wanted. Every answer is a pure function
of the request, so tests can assert exact texts and token counts, and faults are
chosen per request rather than per server, so one process serves every scenario.

A scenario is chosen with mock options, given either in the request body as a
``mock`` object or in the route as ``/s/<options>/v1/...`` where ``<options>`` is
``key=value`` pairs joined by commas (``/s/fault=status,status=503/v1``). Route
options override body options, so a route configured as failing always fails.

Options (all optional):

    text                 str   the completion text (default: generated, see below)
    words                int   words generated when ``text`` is absent (16); 1 word = 1 token
    chunks               int   streamed content chunks (8); words are spread evenly over them
    chunk_delay_ms       int   pause between two streamed content chunks (0)
    first_chunk_delay_ms int   pause after the headers, before the first chunk (0)
    latency_ms           int   pause before the response headers, in every mode (0)
    fault                str   none | status | drop | cut | no_usage | hang
    status               int   HTTP status of ``fault=status`` (500)
    error_message        str   message of the ``fault=status`` error body
    retry_after          int   Retry-After seconds of a status fault (always sent on 429: 1)
    cut_after            int   content chunks sent before ``fault=cut`` closes the stream (2)
    cached_tokens        int   usage.prompt_tokens_details.cached_tokens (0)
    reasoning_tokens     int   usage.completion_tokens_details.reasoning_tokens (0)
    tool_calls           bool  force (true) or forbid (false) a tool-call answer

Besides ``/v1/chat/completions`` and ``/v1/models`` the mock serves ``/mock/stats``,
``/mock/reset`` and ``/mock/wait`` so tests can observe what reached the provider
and wait for a condition (a cancellation, a completion) without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import chain, cycle, islice
from typing import Any

import orjson
from aiohttp import web

__all__ = [
    "MOCK_MODEL_IDS",
    "MOCK_STATS",
    "MockOptions",
    "MockStats",
    "create_mock_app",
    "run_mock_upstream",
    "start_mock_upstream",
]

MOCK_MODEL_IDS = ("mock-gpt", "mock-gpt-mini")
FAULTS = frozenset({"status", "drop", "cut", "no_usage", "hang"})
SYSTEM_FINGERPRINT = "fp_mock"
# The proxy accepts bodies up to 256 MiB, so the mock must never be the one to refuse.
MAX_BODY_BYTES = 256 * 1024 * 1024
# Long enough for a streaming answer in flight to finish, short enough that a hanging
# request left behind by a test does not stall its teardown.
SHUTDOWN_TIMEOUT_S = 1.0
# The first words of every generated answer; the model name and the user's words follow.
_HEAD_WORDS = ("Mock", "reply", "from")
_FILLER_WORDS = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore",
    "magna", "aliqua",
)  # fmt: skip
_IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
_IMAGE_PART_TOKENS = 85
_WORD = re.compile(r"\S+\s*")
_SSE_DONE = b"data: [DONE]\n\n"
_WAITABLE = ("requests", "completed", "cancelled", "faulted", "active")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_DEFAULT_ERROR_MESSAGES = {
    400: "Mock upstream rejected the request.",
    401: "Incorrect API key provided to the mock upstream.",
    429: "Rate limit reached for the mock upstream.",
    500: "The mock upstream had an internal error.",
    502: "The mock upstream got a bad gateway.",
    503: "The mock upstream is overloaded.",
    504: "The mock upstream timed out.",
}


@dataclass(frozen=True, slots=True)
class MockOptions:
    """The scenario of one request, merged from the body's ``mock`` and the route."""

    text: str | None = None
    words: int = 16
    chunks: int = 8
    chunk_delay_ms: int = 0
    first_chunk_delay_ms: int = 0
    latency_ms: int = 0
    fault: str | None = None
    status: int = 500
    error_message: str | None = None
    retry_after: int | None = None
    cut_after: int = 2
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    tool_calls: bool | None = None


DEFAULT_OPTIONS = MockOptions()
_OPTION_KEYS = frozenset(f.name for f in fields(MockOptions))
_INT_OPTIONS = frozenset(
    {
        "words", "chunks", "chunk_delay_ms", "first_chunk_delay_ms", "latency_ms", "status",
        "retry_after", "cut_after", "cached_tokens", "reasoning_tokens",
    }
)  # fmt: skip
_MIN_INT_OPTION = {"chunks": 1, "status": 400}


class MockStats:
    """Counters of what reached the mock, and a way to wait until they reach a value.

    ``requests`` counts chat completion requests, ``completed`` the successful answers
    written in full, ``cancelled`` those abandoned by the client (handler cancelled or
    connection reset mid-answer), ``faulted`` those that selected a fault and ``active``
    those in flight.
    """

    __slots__ = (
        "_changed",
        "_sequence",
        "active",
        "cancelled",
        "completed",
        "faulted",
        "last_headers",
        "last_request",
        "requests",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.completed = 0
        self.cancelled = 0
        self.faulted = 0
        self.active = 0
        self.last_request: Any = None
        self.last_headers: dict[str, str | None] = {}
        # Ids must stay unique for the server's life, so the sequence survives a reset.
        self._sequence = 0
        # Created only while someone waits, so that counting costs nothing otherwise.
        self._changed: asyncio.Event | None = None

    def next_sequence(self) -> int:
        """A number unique to this answer, used in its completion and tool-call ids."""
        self._sequence += 1
        return self._sequence

    def changed(self) -> None:
        """Wake every waiter so it checks its condition against the new counters."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def reset(self) -> None:
        """Zero the counters; ``active`` is a gauge of live requests and is kept."""
        self.requests = self.completed = self.cancelled = self.faulted = 0
        self.last_request = None
        self.last_headers = {}
        self.changed()

    def reached(self, targets: Mapping[str, int]) -> bool:
        """Whether every named counter is at least its target."""
        return all(getattr(self, name) >= value for name, value in targets.items())

    async def wait_for(self, targets: Mapping[str, int], limit_s: float) -> bool:
        """Wait until ``reached(targets)``; False when ``limit_s`` passed first."""
        try:
            async with asyncio.timeout(limit_s):
                while not self.reached(targets):
                    if self._changed is None:
                        self._changed = asyncio.Event()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    def snapshot(self) -> dict[str, Any]:
        """The JSON shape served by ``/mock/stats``."""
        return {
            "requests": self.requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "faulted": self.faulted,
            "active": self.active,
            "last_request": self.last_request,
            "last_headers": self.last_headers,
        }


MOCK_STATS = web.AppKey("mock_stats", MockStats)


class _BadRequest(Exception):
    """The request cannot be served; answered as a 400 ``invalid_request_error``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class _ChatRequest:
    """The fields of a chat completions request that shape the mock's answer."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    tools: list[Any]
    tool_choice: Any
    options: MockOptions


@dataclass(frozen=True, slots=True)
class _ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class _Answer:
    """What the mock answers, shared by the JSON and the streaming renderings."""

    id: str
    content: str | None
    # Streamed deltas: content pieces, or argument fragments of the tool call.
    pieces: list[str]
    tool_call: _ToolCall | None
    finish_reason: str
    usage: dict[str, Any]


# --- Options -------------------------------------------------------------------------


def _coerce_option(key: str, value: object) -> object:
    """Check one option and turn route strings into the option's type."""
    if key not in _OPTION_KEYS:
        raise _BadRequest(f"unknown mock option {key!r}", "mock")
    if key in _INT_OPTIONS:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise _BadRequest(f"mock option {key!r} must be an integer", "mock") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise _BadRequest(f"mock option {key!r} must be an integer", "mock")
        low = _MIN_INT_OPTION.get(key, 0)
        if value < low or (key == "status" and value > 599):
            raise _BadRequest(f"mock option {key!r} is out of range: {value}", "mock")
        return value
    if key == "tool_calls":
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if not isinstance(value, bool):
            raise _BadRequest("mock option 'tool_calls' must be a boolean", "mock")
        return value
    if not isinstance(value, str):
        raise _BadRequest(f"mock option {key!r} must be a string", "mock")
    if key == "fault":
        if value in ("", "none"):
            return None
        if value not in FAULTS:
            raise _BadRequest(f"unknown mock fault {value!r}", "mock")
    return value


def _coerce_options(raw: Mapping[str, object]) -> dict[str, object]:
    # A null value means "unset", so a caller can clear an option in a copied body.
    return {key: _coerce_option(key, value) for key, value in raw.items() if value is not None}


def parse_route_options(options: str) -> dict[str, object]:
    """Parse ``key=value,key=value`` (the ``/s/<options>/`` route segment)."""
    raw: dict[str, object] = {}
    for pair in options.split(","):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep:
            raise _BadRequest(f"route option {pair!r} is not key=value", "mock")
        raw[key.strip()] = value
    return _coerce_options(raw)


def _merge_options(body_mock: object, route_options: str | None) -> MockOptions:
    if body_mock is None and not route_options:
        return DEFAULT_OPTIONS
    if body_mock is not None and not isinstance(body_mock, dict):
        raise _BadRequest("'mock' must be an object", "mock")
    merged = _coerce_options(body_mock or {})
    if route_options:
        merged.update(parse_route_options(route_options))
    return MockOptions(**merged) if merged else DEFAULT_OPTIONS  # type: ignore[arg-type]


# --- Request parsing -----------------------------------------------------------------


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise _BadRequest(f"We could not parse the JSON body of your request: {error}") from None
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object.")
    return body


def _parse_chat(body: dict[str, Any], route_options: str | None) -> _ChatRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _BadRequest("'messages' must be an array of objects", "messages")
    max_tokens = body.get("max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0
    ):
        raise _BadRequest(f"'{param}' must be a non-negative integer", param)
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    tools = body.get("tools")
    return _ChatRequest(
        model=model,
        messages=messages,
        stream=body.get("stream") is True,
        include_usage=include_usage,
        max_tokens=max_tokens,
        tools=tools if isinstance(tools, list) else [],
        tool_choice=body.get("tool_choice"),
        options=_merge_options(body.get("mock"), route_options),
    )


# --- Answer building -----------------------------------------------------------------


def _ceil_div4(n: int) -> int:
    return -(-n // 4)


def _text_of(content: object) -> tuple[str, int]:
    """The text of a message's content and its number of image parts."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts: list[str] = []
    images = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in _IMAGE_PART_TYPES:
            images += 1
    return "".join(texts), images


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """3 + per message (4 + ceil(chars / 4) + 85 per image part), like a real tokenizer's scale."""
    total = 3
    for message in messages:
        text, images = _text_of(message.get("content"))
        total += 4 + _ceil_div4(len(text)) + _IMAGE_PART_TOKENS * images
    return total


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content"))[0]
    return ""


def _generated_tokens(model: str, messages: Sequence[Mapping[str, Any]], count: int) -> list[str]:
    """``count`` words: "Mock reply from <model>:", the user's words, then filler."""
    user_words = _last_user_text(messages).split()
    source = chain(_HEAD_WORDS, (f"{model}:",), user_words, cycle(_FILLER_WORDS))
    words = list(islice(source, count))
    return [f"{word} " for word in words[:-1]] + words[-1:]


def _text_tokens(text: str) -> list[str]:
    """Split ``text`` into words that keep their whitespace, so they join back to ``text``."""
    tokens = _WORD.findall(text)
    lead = len(text) - len(text.lstrip())
    if tokens and lead:
        tokens[0] = text[:lead] + tokens[0]
    return tokens


def _split_evenly(items: Sequence[str], parts: int) -> list[str]:
    """Join ``items`` into at most ``parts`` runs whose sizes differ by at most one."""
    parts = min(parts, len(items))
    if parts <= 0:
        return []
    base, extra = divmod(len(items), parts)
    runs: list[str] = []
    start = 0
    for index in range(parts):
        end = start + base + (1 if index < extra else 0)
        runs.append("".join(items[start:end]))
        start = end
    return runs


def _sample_value(schema: object) -> object:
    """A value that satisfies the simple JSON schemas tools usually declare."""
    if not isinstance(schema, dict):
        return "mock"
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    match kind:
        case "integer" | "number":
            return 1
        case "boolean":
            return True
        case "array":
            return []
        case "object":
            return {}
        case "null":
            return None
        case _:
            return "mock"


def _tool_arguments(parameters: object) -> str:
    """One value per required property of the tool's schema, else ``{"query": "mock"}``."""
    if isinstance(parameters, dict):
        required = parameters.get("required")
        properties = parameters.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        if isinstance(required, list) and required:
            args = {
                name: _sample_value(properties.get(name))
                for name in required
                if isinstance(name, str)
            }
            return orjson.dumps(args).decode()
    return '{"query":"mock"}'


def _pick_tool(chat: _ChatRequest) -> tuple[str, object] | None:
    """The function to call and its parameters schema, or None for a text answer."""
    forced = chat.options.tool_calls
    if forced is False:
        return None
    functions = [
        tool["function"]
        for tool in chat.tools
        if isinstance(tool, dict)
        and tool.get("type", "function") == "function"
        and isinstance(tool.get("function"), dict)
    ]
    if not forced and not (functions and chat.tool_choice != "none"):
        return None
    choice = chat.tool_choice
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if isinstance(name, str):
            schema = next((f.get("parameters") for f in functions if f.get("name") == name), None)
            return name, schema
    if functions:
        first = functions[0]
        return str(first.get("name", "mock_tool")), first.get("parameters")
    return "mock_tool", None


def _usage(prompt: int, completion: int, options: MockOptions) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": options.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": options.reasoning_tokens},
    }


def _build_answer(chat: _ChatRequest, sequence: int) -> _Answer:
    """The deterministic answer to ``chat``; reasoning tokens count as completion tokens."""
    options = chat.options
    prompt_tokens = count_prompt_tokens(chat.messages)
    answer_id = f"chatcmpl-mock-{sequence}"
    tool = _pick_tool(chat)
    if tool is not None:
        name, parameters = tool
        arguments = _tool_arguments(parameters)
        completion = _ceil_div4(len(arguments)) + 5 + options.reasoning_tokens
        return _Answer(
            id=answer_id,
            content=None,
            pieces=_split_evenly(arguments, options.chunks),
            tool_call=_ToolCall(f"call_mock_{sequence}", name, arguments),
            finish_reason="tool_calls",
            usage=_usage(prompt_tokens, completion, options),
        )
    # Reasoning spends the output budget first, as it does with real reasoning models.
    budget = None if chat.max_tokens is None else max(0, chat.max_tokens - options.reasoning_tokens)
    if options.text is not None:
        tokens = _text_tokens(options.text)
        wanted = len(tokens)
    else:
        tokens = []
        wanted = max(options.words, options.chunks) if chat.stream else options.words
    count = wanted if budget is None else min(wanted, budget)
    capped = count < wanted
    if options.text is None:
        tokens = _generated_tokens(chat.model, chat.messages, count)
    elif capped:
        tokens = tokens[:count]
        if tokens:
            tokens[-1] = tokens[-1].rstrip()
    return _Answer(
        id=answer_id,
        content="".join(tokens),
        pieces=_split_evenly(tokens, options.chunks),
        tool_call=None,
        finish_reason="length" if capped else "stop",
        usage=_usage(prompt_tokens, len(tokens) + options.reasoning_tokens, options),
    )


# --- Responses -----------------------------------------------------------------------


def _error_body(status: int, message: str, param: str | None = None) -> bytes:
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    elif status == 401:
        kind, code = "invalid_request_error", "invalid_api_key"
    elif status >= 500:
        kind, code = "server_error", None
    else:
        kind, code = "invalid_request_error", None
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def _json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def _status_fault(options: MockOptions) -> web.Response:
    status = options.status
    message = options.error_message or _DEFAULT_ERROR_MESSAGES.get(
        status, f"The mock upstream answered {status}."
    )
    response = _json_response(_error_body(status, message), status)
    if status == 429 or options.retry_after is not None:
        response.headers["Retry-After"] = str(options.retry_after or 1)
    return response


async def _send(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Write ``response`` now, so a disconnect surfaces here and counters are exact."""
    await response.prepare(request)
    await response.write_eof()
    return response


def _close_connection(request: web.Request) -> None:
    # close() (not abort()) flushes what was already written, so a cut stream always
    # delivers exactly the chunks before the cut.
    transport = request.transport
    if transport is not None:
        transport.close()


def _chunk_envelope(chat: _ChatRequest, answer: _Answer, created: int) -> dict[str, Any]:
    return {
        "id": answer.id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": chat.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def _event(
    envelope: dict[str, Any], delta: dict[str, Any], finish: str | None, usage: bool
) -> bytes:
    chunk = {
        **envelope,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        # OpenAI sends "usage": null on every chunk but the last once usage is asked for.
        chunk["usage"] = None
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _first_delta(answer: _Answer) -> dict[str, Any]:
    call = answer.tool_call
    if call is None:
        return {"role": "assistant", "content": ""}
    # Like OpenAI, the tool call's id and name ride on the role chunk.
    header = {
        "index": 0,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": ""},
    }
    return {"role": "assistant", "content": None, "tool_calls": [header]}


def _piece_delta(answer: _Answer, piece: str) -> dict[str, Any]:
    if answer.tool_call is None:
        return {"content": piece}
    return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


async def _pause(ms: int) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def _stream(
    request: web.Request, chat: _ChatRequest, answer: _Answer, stats: MockStats
) -> web.StreamResponse:
    """Write the answer as SSE, one write per event so nothing is batched."""
    options = chat.options
    cut = options.fault == "cut"
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    envelope = _chunk_envelope(chat, answer, int(time.time()))
    usage = chat.include_usage
    await _pause(options.first_chunk_delay_ms)
    await response.write(_event(envelope, _first_delta(answer), None, usage))
    for index, piece in enumerate(answer.pieces):
        if cut and index == options.cut_after:
            _close_connection(request)
            return response
        if index:
            await _pause(options.chunk_delay_ms)
        await response.write(_event(envelope, _piece_delta(answer, piece), None, usage))
    if cut:
        _close_connection(request)
        return response
    await response.write(_event(envelope, {}, answer.finish_reason, usage))
    if usage and options.fault != "no_usage":
        final = {**envelope, "choices": [], "usage": answer.usage}
        await response.write(b"data: " + orjson.dumps(final) + b"\n\n")
    await response.write(_SSE_DONE)
    await response.write_eof()
    stats.completed += 1
    return response


def _completion_body(chat: _ChatRequest, answer: _Answer) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.tool_call is not None:
        call = answer.tool_call
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
        ]
    body: dict[str, Any] = {
        "id": answer.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": answer.usage,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if chat.options.fault == "no_usage":
        del body["usage"]
    return orjson.dumps(body)


async def _respond(
    request: web.Request, chat: _ChatRequest, answer: _Answer, stats: MockStats
) -> web.StreamResponse:
    body = _completion_body(chat, answer)
    if chat.options.fault == "cut":
        # Promise the whole body, deliver half of it, then hang up.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        _close_connection(request)
        return response
    response = await _send(request, _json_response(body))
    stats.completed += 1
    return response


async def _answer_chat(request: web.Request, stats: MockStats) -> web.StreamResponse:
    try:
        body = _parse_body(await request.read())
        stats.last_request = body
        chat = _parse_chat(body, request.match_info.get("options"))
    except _BadRequest as error:
        return await _send(
            request, _json_response(_error_body(400, error.message, error.param), 400)
        )
    options = chat.options
    await _pause(options.latency_ms)
    fault = options.fault
    if fault is not None:
        stats.faulted += 1
    if fault == "status":
        return await _send(request, _status_fault(options))
    if fault == "drop":
        # Nothing is written: the returned response fails on the closed transport,
        # which aiohttp treats as a client that went away.
        _close_connection(request)
        return web.Response()
    if fault == "hang":
        # Only the client leaving (which cancels this handler) ends the wait.
        await asyncio.get_running_loop().create_future()
    answer = _build_answer(chat, stats.next_sequence())
    if chat.stream:
        return await _stream(request, chat, answer, stats)
    return await _respond(request, chat, answer, stats)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions (and under /s/{options}/)."""
    stats = request.app[MOCK_STATS]
    stats.requests += 1
    stats.active += 1
    headers: dict[str, str | None] = {"authorization": None}
    headers.update((name.lower(), value) for name, value in request.headers.items())
    stats.last_headers = headers
    # Waiters on "requests" or "active" must see the request arrive, not only finish.
    stats.changed()
    try:
        return await _answer_chat(request, stats)
    except asyncio.CancelledError:
        stats.cancelled += 1
        raise
    except ConnectionResetError:
        # A write found the client gone; aiohttp's own write of this placeholder fails
        # the same way and is taken as a premature disconnect, without a log line.
        stats.cancelled += 1
        _close_connection(request)
        return web.Response()
    finally:
        stats.active -= 1
        stats.changed()


async def _models(request: web.Request) -> web.Response:
    """GET /v1/models: the OpenAI list shape."""
    data = [
        {"id": model_id, "object": "model", "created": 0, "owned_by": "tollgate-mock"}
        for model_id in MOCK_MODEL_IDS
    ]
    return _json_response(orjson.dumps({"object": "list", "data": data}))


async def _stats(request: web.Request) -> web.Response:
    """GET /mock/stats."""
    return _json_response(orjson.dumps(request.app[MOCK_STATS].snapshot()))


async def _reset(request: web.Request) -> web.Response:
    """POST /mock/reset."""
    stats = request.app[MOCK_STATS]
    stats.reset()
    return _json_response(orjson.dumps(stats.snapshot()))


async def _wait(request: web.Request) -> web.Response:
    """GET /mock/wait?cancelled=N&completed=N&timeout_s=5: 200 once reached, else 408."""
    stats = request.app[MOCK_STATS]
    targets: dict[str, int] = {}
    limit_s = 5.0
    try:
        for name, value in request.query.items():
            if name == "timeout_s":
                limit_s = float(value)
            elif name in _WAITABLE:
                targets[name] = int(value)
            else:
                raise ValueError(f"unknown wait condition {name!r}")
    except ValueError as error:
        return _json_response(_error_body(400, str(error)), 400)
    reached = await stats.wait_for(targets, limit_s)
    return _json_response(orjson.dumps(stats.snapshot()), 200 if reached else 408)


def create_mock_app() -> web.Application:
    """The mock upstream application, with fresh counters under ``MOCK_STATS``."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[MOCK_STATS] = MockStats()
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/s/{options}/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/s/{options}/v1/models", _models)
    app.router.add_get("/mock/stats", _stats)
    app.router.add_post("/mock/reset", _reset)
    app.router.add_get("/mock/wait", _wait)
    return app


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def start_mock_upstream(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve the mock in the running loop; returns the runner and ``http://host:port/v1``.

    With ``port=0`` the OS picks a free port, which is read back from the socket; pass
    a literal IP then, because a name such as ``localhost`` may bind several sockets
    on different ports. Stop the server with ``await runner.cleanup()``.
    """
    # handler_cancellation makes a client disconnect cancel the handler, which is how
    # the mock observes (and counts) abandoned requests.
    runner = web.AppRunner(
        create_mock_app(),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return runner, f"http://{_url_host(host)}:{bound_port}/v1"


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve_until_signalled(host: str, port: int) -> None:
    runner, base_url = await start_mock_upstream(host, port)
    try:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Windows has no loop signal handlers; Ctrl-C still interrupts the run there.
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        print(f"mock upstream listening on {base_url}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def run_mock_upstream(host: str, port: int) -> None:
    """Serve the mock until SIGINT or SIGTERM (blocking); uses uvloop when installed.

    Prints one line, ``mock upstream listening on http://HOST:PORT/v1``, once bound,
    so a parent process can read the real port when ``port`` is 0.
    """
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve_until_signalled(host, port))
