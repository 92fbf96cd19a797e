"""Rewriting upstream answers for the client, chunk by chunk.

Every chunk leaves with our request id, the public model id and the provider
that served it. Usage is taken out of the stream and sent once, last, after the
pipeline settled (so later stages can add the cost to it); it goes to the
client only when the client asked for it with ``stream_options.include_usage``.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.errors import ApiError
from app.proxy.pipeline import ChatCall, Usage

DONE_EVENT = b"data: [DONE]\n\n"
KEEPALIVE_EVENT = b": keep-alive\n\n"


def sse_event(document: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(document) + b"\n\n"


def error_event(error: ApiError) -> bytes:
    return sse_event(error.body())


class StreamRewriter:
    """Turns upstream chunk payloads into client events and keeps the call's outcome."""

    def __init__(self, call: ChatCall) -> None:
        assert call.outcome.candidate is not None
        self.call = call
        self.public_model = call.outcome.candidate.model.id
        self.provider = call.outcome.candidate.route.provider.name
        self.include_usage = call.chat.include_usage
        self.role_sent = False
        self.finished_choices = 0
        self.created: int | None = None
        self.system_fingerprint: str | None = None

    def rewrite(self, document: dict[str, Any]) -> bytes | None:
        """The client event for one upstream chunk, or None when it carries only usage."""
        outcome = self.call.outcome
        usage = Usage.from_openai(document.pop("usage", None))
        if usage is not None:
            outcome.usage = usage
        choices = document.get("choices")
        if not isinstance(choices, list) or not choices:
            return None
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                outcome.completion_chars += _delta_chars(delta)
                if not self.role_sent and "role" not in delta:
                    delta["role"] = "assistant"
            if choice.get("finish_reason"):
                self.finished_choices += 1
        self.role_sent = True
        if self.include_usage:
            document["usage"] = None
        self.created = document.get("created", self.created)
        self.system_fingerprint = document.get("system_fingerprint", self.system_fingerprint)
        document["id"] = self.call.request_id
        document["model"] = self.public_model
        document["provider"] = self.provider
        return sse_event(document)

    @property
    def complete(self) -> bool:
        """Did every choice reach a finish_reason?"""
        return self.finished_choices >= self.call.chat.n

    def usage_event(self, extra: dict[str, object] | None = None) -> bytes | None:
        """The final usage chunk, if the client asked for one."""
        usage = self.call.outcome.usage
        if not self.include_usage or usage is None:
            return None
        body = usage.to_openai()
        if extra:
            body.update(extra)
        return sse_event(
            {
                "id": self.call.request_id,
                "object": "chat.completion.chunk",
                "created": self.created or 0,
                "model": self.public_model,
                "provider": self.provider,
                "system_fingerprint": self.system_fingerprint,
                "choices": [],
                "usage": body,
            }
        )


def _delta_chars(delta: dict[str, Any]) -> int:
    chars = 0
    content = delta.get("content")
    if isinstance(content, str):
        chars += len(content)
    for key in ("reasoning", "reasoning_content", "refusal"):
        value = delta.get(key)
        if isinstance(value, str):
            chars += len(value)
    tool_calls = delta.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                chars += len(function.get("arguments") or "") + len(function.get("name") or "")
    return chars


def message_chars(document: dict[str, Any]) -> int:
    """Characters produced in a non-streaming answer: the basis of an estimate."""
    chars = 0
    for choice in document.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            chars += _delta_chars(message)
    return chars
