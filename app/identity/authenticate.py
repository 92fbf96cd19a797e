"""Authenticating a request: ``authenticate(request)`` and the pipeline stage that calls it.

Any handler that needs the caller (``/v1/account``, ``/v1/usage``, ...) awaits
``authenticate(request)``; it runs once per request and keeps the ``Principal``
on ``request[PRINCIPAL]``, so calling it again, or the stage after a handler,
costs nothing.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from app.identity.principal import PRINCIPAL, Principal
from app.identity.sessions import SESSIONS
from app.identity.tokens import bearer_token
from app.proxy.pipeline import ChatCall


async def authenticate(request: web.Request) -> Principal:
    """The caller behind a live session token, or an ``ApiError`` (401/403/503)."""
    principal = request.get(PRINCIPAL)
    if principal is None:
        token = bearer_token(request.headers.getall(hdrs.AUTHORIZATION, []))
        principal = await request.app[SESSIONS].authenticate(token)
        request[PRINCIPAL] = principal
    return principal


class IdentityStage:
    """First stage of every chat call: no principal, no call."""

    name = "identity"

    async def admit(self, call: ChatCall) -> None:
        call.principal = await authenticate(call.http)

    async def settle(self, call: ChatCall) -> None:
        return None
