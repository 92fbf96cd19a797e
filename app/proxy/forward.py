"""Forwarding a chat call along its route plan, with fallback before the first byte.

A route is abandoned for the next one on connection errors, timeouts, 429 and
5xx, and (streaming) when the upstream ends before its first event, but only
while nothing has reached the client. Once the client has a byte, failures go
to the client in the stream instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web

from app.config.catalog import Provider
from app.errors import ApiError, UpstreamError
from app.proxy.http_client import (
    AnswerTimeout,
    HttpClientError,
    UpstreamClient,
    UpstreamResponse,
)
from app.proxy.pipeline import ChatCall, Pipeline, Usage
from app.proxy.relay import (
    DONE_EVENT,
    KEEPALIVE_EVENT,
    StreamRewriter,
    error_event,
    message_chars,
)
from app.proxy.routing import Candidate
from app.proxy.upstream import (
    FailureKind,
    RouteFailure,
    StreamEnd,
    iter_sse_data,
    open_response,
    read_json_body,
    sanitize,
)

T = TypeVar("T")
FailureObserver = Callable[[RouteFailure], None]
ResponseFactory = Callable[[ChatCall], web.StreamResponse]


class Forwarder:
    """Sends chat calls upstream through the app's one ``UpstreamClient``."""

    def __init__(
        self,
        client: UpstreamClient,
        pipeline: Pipeline,
        *,
        keepalive_s: float,
        on_failure: FailureObserver | None = None,
    ) -> None:
        self.client = client
        self.pipeline = pipeline
        self.keepalive_s = keepalive_s
        self.on_failure = on_failure or (lambda failure: None)

    def _upstream_body(self, call: ChatCall, candidate: Candidate) -> bytes:
        body = dict(call.chat.forward_body)
        body["model"] = candidate.route.upstream_model
        if call.chat.stream:
            # Always ask for usage: billing needs it whether or not the client wants it.
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        return orjson.dumps(body)

    def _failed(self, call: ChatCall, failure: RouteFailure) -> None:
        self.on_failure(failure)
        call.route_failures.append(str(failure))

    # -- non-streaming -------------------------------------------------------

    async def complete(self, call: ChatCall) -> dict[str, Any]:
        """Forward a non-streaming call; return the rewritten answer after the pipeline settled."""
        outcome = call.outcome
        started_s = time.perf_counter()
        try:
            # Verdicts still on their way (Pipeline.overlap) arrive during the upstream call.
            document = await self.pipeline.overlap(call, self._first_answer(call))
            call.timed("upstream", started_s)
        except BaseException as error:
            outcome.error = error if isinstance(error, ApiError) else None
            outcome.finish("cancelled" if isinstance(error, asyncio.CancelledError) else "error",
                           call.chat.prompt_chars)
            await self.pipeline.settle_shielded(call)
            raise
        candidate = outcome.candidate
        assert candidate is not None
        outcome.completion_chars = message_chars(document)
        outcome.usage = Usage.from_openai(document.get("usage"))
        outcome.finish("ok", call.chat.prompt_chars)
        await self.pipeline.settle_shielded(call)
        assert outcome.usage is not None, "a completed call always has usage"
        document["id"] = call.request_id
        document["model"] = candidate.model.id
        document["provider"] = candidate.route.provider.name
        document["usage"] = {**outcome.usage.to_openai(), **call.usage_extra}
        return document

    async def _first_success(
        self, call: ChatCall, attempt: Callable[[Candidate], Awaitable[T]]
    ) -> T:
        """Try the plan's routes in order; the first that succeeds serves the call.

        Only a retryable failure moves on to the next route; any other is the answer.
        """
        last: RouteFailure | None = None
        for candidate in call.plan:
            call.outcome.attempts += 1
            try:
                result = await attempt(candidate)
            except RouteFailure as failure:
                self._failed(call, failure)
                if not failure.retryable:
                    raise failure.to_api_error() from None
                last = failure
                continue
            call.outcome.candidate = candidate
            return result
        raise _exhausted(last)

    async def _first_answer(self, call: ChatCall) -> dict[str, Any]:
        async def attempt(candidate: Candidate) -> dict[str, Any]:
            provider = candidate.route.provider
            # The first-byte timeout covers a non-streaming answer's body too (and
            # never outlasts the total timeout).
            deadline_s = asyncio.get_running_loop().time() + min(
                provider.first_byte_timeout_s, provider.total_timeout_s)
            response = await open_response(
                self.client, provider, self._upstream_body(call, candidate), call.request_id,
                deadline_s)
            return await read_json_body(response, provider)

        return await self._first_success(call, attempt)

    # -- streaming -----------------------------------------------------------

    async def stream(
        self, call: ChatCall, http_request: web.Request, make_response: ResponseFactory
    ) -> web.StreamResponse:
        """Relay a streaming call; the client response is prepared at the first upstream event."""
        outcome = call.outcome
        outcome.streamed = True
        relay: _OpenStream | None = None
        response: web.StreamResponse | None = None
        started_s = time.perf_counter()
        try:
            relay = await self.pipeline.overlap(call, self._first_event(call),
                                                discard=_OpenStream.close)
            call.timed("upstream", started_s)
            response = make_response(call)
            await response.prepare(http_request)
            await self._relay(call, relay, response)
            return response
        except BaseException as error:
            if outcome.finished_s is None:
                cancelled = isinstance(error, (asyncio.CancelledError, ConnectionError))
                outcome.error = error if isinstance(error, ApiError) else None
                outcome.finish("cancelled" if cancelled else "error", call.chat.prompt_chars)
            await self.pipeline.settle_shielded(call)
            if isinstance(error, ConnectionError) and response is not None and response.prepared:
                # The client went away mid-stream: nobody is left to answer.
                return response
            raise
        finally:
            if relay is not None:
                await relay.close()

    async def _first_event(self, call: ChatCall) -> _OpenStream:
        async def attempt(candidate: Candidate) -> _OpenStream:
            provider = candidate.route.provider
            now_s = asyncio.get_running_loop().time()
            deadline_s = now_s + provider.total_timeout_s
            # Until the first event the route has not answered: the first-byte timeout.
            response = await open_response(
                self.client, provider, self._upstream_body(call, candidate), call.request_id,
                min(now_s + provider.first_byte_timeout_s, deadline_s))
            relay = _OpenStream(response, provider)
            try:
                await relay.peek()
            except BaseException:
                await relay.close()
                raise
            # From here each read may wait the idle timeout, all of them the total one.
            response.limit_time(deadline_s, provider.idle_timeout_s)
            return relay

        return await self._first_success(call, attempt)

    async def _relay(
        self, call: ChatCall, relay: _OpenStream, response: web.StreamResponse
    ) -> None:
        rewriter = StreamRewriter(call)
        outcome = call.outcome
        provider = relay.provider
        failure: ApiError | None = None
        # Each event is written as it arrives; while the upstream is silent, a watchdog
        # of its own keeps the client's connection alive (no timeout around each read).
        keep_alive = _KeepAlive(response, self.keepalive_s)
        try:
            while True:
                item = await relay.next()
                if isinstance(item, StreamEnd):
                    if item.failure is not None:
                        failure = item.failure.to_api_error()
                        self._failed(call, item.failure)
                    elif not rewriter.complete:
                        failure = UpstreamError(
                            f"upstream provider '{provider.name}' ended the stream early",
                            code="upstream_stream_cut",
                        )
                    break
                if item == b"[DONE]":
                    break
                document = _chunk(item)
                if document is None:
                    failure = UpstreamError(
                        f"upstream provider '{provider.name}' sent an unreadable chunk",
                        code="upstream_bad_chunk",
                    )
                    break
                if "error" in document and not document.get("choices"):
                    failure = _stream_error(document["error"], provider)
                    break
                event = rewriter.rewrite(document)
                if event is not None:
                    outcome.mark_first_chunk()
                    await keep_alive.write(event)
        finally:
            keep_alive.stop()
        outcome.error = failure
        outcome.finish("ok" if failure is None else "error", call.chat.prompt_chars)
        try:
            await self.pipeline.settle_shielded(call)
        except ApiError as refusal:
            failure = failure or refusal
        if failure is not None:
            await response.write(error_event(failure))
        else:
            usage_event = rewriter.usage_event(call.usage_extra)
            if usage_event is not None:
                await response.write(usage_event)
        await response.write(DONE_EVENT)
        await response.write_eof()


class _KeepAlive:
    """Writes a stream's events, and an SSE comment whenever ``interval_s`` passed without one."""

    def __init__(self, response: web.StreamResponse, interval_s: float) -> None:
        self.response = response
        self.interval_s = interval_s
        self.loop = asyncio.get_running_loop()
        self.last_write_s = self.loop.time()
        self.task = asyncio.ensure_future(self._watch())

    async def write(self, data: bytes) -> None:
        await self.response.write(data)
        self.last_write_s = self.loop.time()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.last_write_s + self.interval_s - self.loop.time())
            if self.loop.time() - self.last_write_s >= self.interval_s:
                await self.write(KEEPALIVE_EVENT)

    def stop(self) -> None:
        self.task.cancel()


class _OpenStream:
    """An upstream SSE response, read one event at a time by the relay itself.

    ``peek`` reads the first event: it decides whether the route answered at all.
    Reads are bounded by the response's time limits (``limit_time``: the idle and
    total timeouts), watched by the connection; a timeout abandons the stream, so
    cutting a half-read line short loses nothing. (Keep-alives are the writer's
    business: ``_KeepAlive``.)
    """

    def __init__(self, response: UpstreamResponse, provider: Provider) -> None:
        self.response = response
        self.provider = provider
        self.events: AsyncGenerator[bytes, None] = iter_sse_data(response)
        self.first: bytes | None = None
        self.ended = False

    async def peek(self) -> None:
        """Read the first event; a stream that fails or ends before it is a failed route.

        Bounded in time by the response's deadline (the first-byte timeout)."""
        try:
            first = await anext(self.events, None)
        except AnswerTimeout:
            raise RouteFailure(self.provider.name, FailureKind.TIMEOUT,
                               "no first chunk in time") from None
        except HttpClientError:
            raise RouteFailure(
                self.provider.name, FailureKind.CONNECT, "stream cut short"
            ) from None
        if first is None:
            raise RouteFailure(
                self.provider.name, FailureKind.BAD_RESPONSE, "stream ended before any chunk"
            )
        self.first = first

    async def next(self) -> bytes | StreamEnd:
        """The next event's data, or the end (with the failure that ended it, if any)."""
        if self.first is not None:
            first, self.first = self.first, None
            return first
        if self.ended:
            return StreamEnd()
        try:
            data = await anext(self.events, None)
        except AnswerTimeout as timeout:
            self.ended = True
            return StreamEnd(RouteFailure(self.provider.name, FailureKind.TIMEOUT,
                                          "stream stalled" if timeout.idle
                                          else "stream not done in time"))
        except HttpClientError:
            self.ended = True
            return StreamEnd(RouteFailure(self.provider.name, FailureKind.CONNECT,
                                          "stream cut short"))
        if data is None:
            self.ended = True
            return StreamEnd()
        return data

    async def close(self) -> None:
        """Stop reading and drop the upstream connection, which cancels the upstream work."""
        await self.events.aclose()
        self.response.close()


def _chunk(data: bytes) -> dict[str, Any] | None:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _stream_error(error: object, provider: Provider) -> ApiError:
    message = error.get("message") if isinstance(error, dict) else error
    text = sanitize(str(message or "error"), provider)
    return UpstreamError(f"upstream provider '{provider.name}' failed mid-stream: {text}")


def _exhausted(last: RouteFailure | None) -> ApiError:
    if last is None:
        return UpstreamError("no upstream route could be tried")
    return last.to_api_error()
