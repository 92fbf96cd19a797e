"""Talking to one upstream route: send, classify failures, read server-sent events.

Failures are translated into ``RouteFailure`` here and nowhere else. A failure
is ``retryable`` when another route may succeed: connection errors, timeouts,
429 and 5xx. Upstream messages are sanitized before anyone sees them, so a key
or a URL with credentials never leaks to a client or a log.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from enum import StrEnum

import orjson

from app.config.catalog import Provider
from app.errors import ApiError, InvalidRequest, RequestTooLarge, UpstreamError, UpstreamTimeout
from app.proxy.http_client import (
    AnswerTimeout,
    ConnectError,
    ConnectionClosed,
    HttpClientError,
    MalformedResponse,
    ResponseTooLarge,
    UpstreamClient,
    UpstreamResponse,
)

# An upstream answer larger than this is a fault, not a completion.
MAX_UPSTREAM_BODY_BYTES = 64 * 1024 * 1024
MAX_SSE_LINE_BYTES = 8 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_ERROR_MESSAGE_CHARS = 500


class FailureKind(StrEnum):
    CONNECT = "connect"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    BAD_RESPONSE = "bad_response"
    CREDENTIALS = "credentials"
    REJECTED = "rejected"


_RETRYABLE = {
    FailureKind.CONNECT,
    FailureKind.TIMEOUT,
    FailureKind.RATE_LIMITED,
    FailureKind.SERVER_ERROR,
    FailureKind.BAD_RESPONSE,
}


class RouteFailure(Exception):
    """One route failed; ``kind`` says whether trying the next route makes sense."""

    def __init__(
        self, provider: str, kind: FailureKind, message: str, status: int | None = None
    ) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.kind = kind
        self.message = message
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.kind in _RETRYABLE

    def to_api_error(self) -> ApiError:
        """The client-facing error when this is the last failure of a request."""
        text = f"upstream provider '{self.provider}' failed: {self.message}"
        if self.kind is FailureKind.TIMEOUT:
            return UpstreamTimeout(text)
        if self.kind is FailureKind.REJECTED and self.status == 413:
            return RequestTooLarge(text, code="upstream_request_too_large")
        if self.kind is FailureKind.REJECTED:
            return InvalidRequest(text, code="upstream_rejected")
        if self.kind is FailureKind.RATE_LIMITED:
            return UpstreamError(text, code="upstream_rate_limited")
        return UpstreamError(text)


_SECRET_PATTERNS = (
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_-]{6,}"), r"\1-***"),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{10,}"), "***"),
    (re.compile(r"(?i)([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]*@"), r"\1***@"),
    (re.compile(r"(?i)([?&](?:key|api_key|apikey|token|access_token)=)[^&\s]+"), r"\1***"),
)


def sanitize(message: str, provider: Provider) -> str:
    """Remove anything that looks like a credential from an upstream message."""
    if provider.api_key:
        message = message.replace(provider.api_key, "***")
    for pattern, replacement in _SECRET_PATTERNS:
        message = pattern.sub(replacement, message)
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS] + "…"
    return message


def request_headers(provider: Provider, request_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    headers.update(provider.headers)
    if provider.api_key:
        headers["Authorization"] = f"Bearer {provider.api_key}"
    return headers


async def open_response(
    client: UpstreamClient, provider: Provider, body: bytes, request_id: str,
    deadline_s: float,
) -> UpstreamResponse:
    """POST the body; return a 200 response with its headers read, or raise RouteFailure.

    ``deadline_s`` (loop clock) bounds the whole answer until the caller changes it
    with ``response.limit_time`` (a stream, once its first event is in).
    """
    url = f"{provider.base_url}/chat/completions"
    try:
        response = await client.post(url, body, request_headers(provider, request_id),
                                     connect_timeout_s=provider.connect_timeout_s,
                                     deadline_s=deadline_s)
    except HttpClientError as error:
        raise _failure(error, provider) from None
    if response.status != 200:
        await _raise_for_status(response, provider)
    return response


async def read_json_body(response: UpstreamResponse, provider: Provider) -> dict:
    """Read a non-streaming answer, bounded in size (and in time by its deadline)."""
    try:
        raw = await response.read(MAX_UPSTREAM_BODY_BYTES)
    except HttpClientError as error:
        response.close()
        raise _failure(error, provider) from None
    except BaseException:
        response.close()  # Cancelled: the connection's state is unknown.
        raise
    response.release()
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RouteFailure(provider.name, FailureKind.BAD_RESPONSE, "answer is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("choices"), list):
        raise RouteFailure(provider.name, FailureKind.BAD_RESPONSE, "answer has no choices")
    return document


def _failure(error: HttpClientError, provider: Provider) -> RouteFailure:
    """The one translation of the HTTP client's errors into route failures."""
    if isinstance(error, AnswerTimeout):
        return RouteFailure(provider.name, FailureKind.TIMEOUT,
                            "stream stalled" if error.idle else str(error))
    if isinstance(error, ConnectError):
        return RouteFailure(provider.name, FailureKind.CONNECT, "cannot connect")
    if isinstance(error, ConnectionClosed):
        return RouteFailure(provider.name, FailureKind.CONNECT, str(error))
    if isinstance(error, (MalformedResponse, ResponseTooLarge)):
        return RouteFailure(provider.name, FailureKind.BAD_RESPONSE, str(error))
    return RouteFailure(provider.name, FailureKind.CONNECT, type(error).__name__)


async def _raise_for_status(response: UpstreamResponse, provider: Provider) -> None:
    status = response.status
    try:
        raw = await response.read_prefix(MAX_ERROR_BODY_BYTES)
    except BaseException:
        response.close()
        raise
    response.release()
    message = sanitize(_error_message(raw) or f"HTTP {status}", provider)
    if status == 429:
        kind = FailureKind.RATE_LIMITED
    elif status >= 500:
        kind = FailureKind.SERVER_ERROR
    elif status in (401, 403):
        kind = FailureKind.CREDENTIALS
        message = "the provider refused Tollgate's credentials"
    elif status == 404:
        # The catalog names a model the provider does not have: our configuration, not the caller.
        kind = FailureKind.SERVER_ERROR
    else:
        kind = FailureKind.REJECTED
    raise RouteFailure(provider.name, kind, f"HTTP {status}: {message}", status)


def _error_message(raw: bytes) -> str:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()[:MAX_ERROR_MESSAGE_CHARS]
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(document.get("message"), str):
            return document["message"]
    return ""


async def iter_sse_data(response: UpstreamResponse) -> AsyncGenerator[bytes, None]:
    """Yield the data of each server-sent event (multi-line data joined by newlines).

    Comments and other fields are dropped: OpenAI streams carry everything in
    ``data``. Ends at EOF; a trailing event without its blank line still counts.
    """
    data: list[bytes] = []
    while True:
        line = await response.readline(MAX_SSE_LINE_BYTES)
        if not line:
            if data:
                yield b"\n".join(data)
            return
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield b"\n".join(data)
                data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)


@dataclass(slots=True)
class StreamEnd:
    """Marks the end of an upstream stream; ``failure`` is set when it did not end well."""

    failure: RouteFailure | None = None
