"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import hdrs, web

from app.errors import CreditLimitExceeded, InvalidRequest
from app.http.keys import CATALOG, FORWARDER, PIPELINE, SETTINGS
from app.http.request_context import request_id
from app.identity.authenticate import authenticate_early
from app.identity.principal import Principal
from app.ledger.holds import max_cost_micros
from app.payments.setup import PAYMENTS, resource_url, x402_caller
from app.proxy.chat_request import parse_chat_request
from app.proxy.pipeline import ChatCall
from app.proxy.routing import plan_routes

PROVIDER_HEADER = "X-Tollgate-Provider"
# Where the time of a request went (W3C Server Timing): each stage, and the upstream.
SERVER_TIMING_HEADER = "Server-Timing"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    payments = request.app.get(PAYMENTS)
    # Credentials first: an anonymous caller gets 401 before we read megabytes of body.
    # The identity stage later reuses the principal cached on the request. With x402
    # on, a request without a session may carry a payment instead, or be asked for one.
    started_s = time.perf_counter()
    principal: Principal | None
    if payments is None or hdrs.AUTHORIZATION in request.headers:
        principal = await authenticate_early(request)
    else:
        principal = await x402_caller(request)
    authenticated_s = time.perf_counter()
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(
            f"the body is not valid JSON ({error.msg} at position {error.pos})",
            code="invalid_json",
        ) from None
    chat = parse_chat_request(body, max_messages=settings.max_messages, max_n=settings.max_n)
    plan = plan_routes(request.app[CATALOG], chat)
    call = ChatCall(request_id(request), request, chat, plan)
    call.timings += [("auth", authenticated_s - started_s),
                     ("parse", time.perf_counter() - authenticated_s)]
    if principal is None:
        assert payments is not None
        raise payments.ask(
            "payment required: pay with x402 (or authorize a wallet session)",
            max_cost_micros(call, settings.commission_bps), resource_url(request))
    if chat.stream:
        # Let streams already running relay what arrived meanwhile: a burst of stream
        # starts (~0.3 ms of CPU each) would otherwise run as one loop iteration longer
        # than the gap between two events, which then leave back to back.
        await asyncio.sleep(0)
    try:
        # Verdicts a stage deferred arrive while the upstream is asked (Pipeline.overlap):
        # the credit check can refuse from the forwarder too, before any byte is sent.
        await request.app[PIPELINE].admit(call, overlap=True)
        forwarder = request.app[FORWARDER]
        if chat.stream:
            return await forwarder.stream(call, request, _stream_response)
        document = await forwarder.complete(call)
    except CreditLimitExceeded as refusal:
        if payments is None:
            raise
        raise payments.ask_for(refusal, resource_url(request)) from None
    candidate = call.outcome.candidate
    assert candidate is not None
    headers = {PROVIDER_HEADER: candidate.route.provider.name}
    headers.update(call.response_headers)
    headers[SERVER_TIMING_HEADER] = call.server_timing()
    return web.Response(body=orjson.dumps(document), content_type="application/json",
                        headers=headers)


def _stream_response(call: ChatCall) -> web.StreamResponse:
    """Headers of a stream are fixed when it starts: stages' headers must be known by then."""
    candidate = call.outcome.candidate
    assert candidate is not None
    headers = {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        PROVIDER_HEADER: candidate.route.provider.name,
    }
    headers.update(call.response_headers)
    headers[SERVER_TIMING_HEADER] = call.server_timing()
    return EventStreamResponse(headers=headers)


class EventStreamResponse(web.StreamResponse):
    """A relayed event stream, whose headers leave with its first events in one write.

    The response is prepared only once the upstream's first event is here, so
    nothing waits for that write; a plain ``StreamResponse`` writes its headers
    at ``prepare()``, one more write (and wake-up of the client) before the
    first chunk. aiohttp's own ``Response`` buffers them the same way.
    """

    _send_headers_immediately = False
