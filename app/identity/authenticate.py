"""Authenticating a request: ``authenticate(request)`` and the pipeline stage that calls it.

Any handler that needs the caller (``/v1/account``, ``/v1/usage``, ...) awaits
``authenticate(request)``; it runs once per request and keeps the ``Principal``
on ``request[PRINCIPAL]``, so calling it again, or the stage after a handler,
costs nothing.

The chat route calls ``authenticate_early`` instead: a session seen moments ago
is let in while Redis says whether it was revoked since, and the identity stage
defers that answer (``ChatCall.defer``), so it arrives with the upstream's.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from app.identity.principal import PRINCIPAL, Principal
from app.identity.sessions import SESSIONS, RevocationCheck
from app.identity.tokens import bearer_token
from app.proxy.pipeline import ChatCall

# The revocation check of an early authentication, until the identity stage takes it.
REVOCATION_CHECK = web.RequestKey("revocation_check", RevocationCheck)


async def authenticate(request: web.Request) -> Principal:
    """The caller behind a live session token, or an ``ApiError`` (401/403/503)."""
    principal = request.get(PRINCIPAL)
    if principal is None:
        token = bearer_token(request.headers.getall(hdrs.AUTHORIZATION, []))
        principal = await request.app[SESSIONS].authenticate(token)
        request[PRINCIPAL] = principal
    return principal


async def authenticate_early(request: web.Request) -> Principal:
    """``authenticate``, leaving a recently seen session's revocation check to the stage."""
    assert PRINCIPAL not in request, "authenticated twice"
    token = bearer_token(request.headers.getall(hdrs.AUTHORIZATION, []))
    early = await request.app[SESSIONS].authenticate_early(token)
    request[PRINCIPAL] = early.principal
    if early.check is not None:
        request[REVOCATION_CHECK] = early.check
    return early.principal


class IdentityStage:
    """First stage of every chat call: no principal, no call."""

    name = "identity"

    async def admit(self, call: ChatCall) -> None:
        call.principal = await authenticate(call.http)
        check = call.http.pop(REVOCATION_CHECK, None)
        if check is not None:
            call.defer(self.name, call.http.app[SESSIONS].confirm(check))

    async def settle(self, call: ChatCall) -> None:
        return None
