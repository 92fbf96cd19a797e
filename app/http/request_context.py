"""Request ids: every response carries ``X-Request-Id``.

Ours is always generated, because the ledger uses it as the idempotency key and
a client-chosen value could collide; a client's ``X-Client-Request-Id`` is
echoed back beside it (OpenAI's convention) when it is short printable ASCII.
"""

from __future__ import annotations

import re
import secrets

from aiohttp import web

REQUEST_ID = web.RequestKey("request_id", str)
MAX_CLIENT_REQUEST_ID_CHARS = 512
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def request_id(request: web.Request) -> str:
    return request[REQUEST_ID]


def assign_request_id(request: web.Request) -> None:
    """Give the request its id; the outermost middleware calls this first of all."""
    request[REQUEST_ID] = new_request_id()


async def add_request_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: reaches streamed responses and error pages alike."""
    request_id_value = request.get(REQUEST_ID) or new_request_id()
    response.headers["X-Request-Id"] = request_id_value
    client_id = request.headers.get("X-Client-Request-Id")
    if (
        client_id
        and len(client_id) <= MAX_CLIENT_REQUEST_ID_CHARS
        and _PRINTABLE.match(client_id)
    ):
        response.headers["X-Client-Request-Id"] = client_id
