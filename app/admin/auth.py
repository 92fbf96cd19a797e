"""The operator's bearer token: the one check every admin endpoint makes first."""

from __future__ import annotations

import hmac

from aiohttp import hdrs, web

from app.errors import NotFound
from app.http.keys import SETTINGS
from app.identity.tokens import bearer_token, token_refused


def require_admin(request: web.Request) -> None:
    """The operator's token, compared in constant time; without one configured the admin
    endpoints do not exist (404), so an unset token leaves nothing to probe."""
    admin_token = request.app[SETTINGS].admin_token
    if admin_token is None:
        raise NotFound("unknown URL; see the API reference", code="unknown_url")
    presented = bearer_token(request.headers.getall(hdrs.AUTHORIZATION, []))
    if not hmac.compare_digest(presented.encode(), admin_token.get_secret_value().encode()):
        raise token_refused("not the admin token", "invalid_admin_token")
