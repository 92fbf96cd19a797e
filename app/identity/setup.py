"""Installs the identity concern: its resources, its routes, and its pipeline stage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from app.http.keys import DATABASE, REDIS, SETTINGS
from app.identity.account_cache import SessionAccountCache
from app.identity.authenticate import IdentityStage
from app.identity.revocation_list import RevocationList
from app.identity.routes import add_routes
from app.identity.session_store import SessionStore
from app.identity.sessions import SESSIONS, Sessions
from app.identity.token_keys import load_token_keys
from app.identity.tokens import TokenCodec
from app.identity.verifier import AuthorizationVerifier, EoaVerifier
from app.proxy.pipeline import Stage


def setup_identity(app: web.Application, *,
                   verifier: AuthorizationVerifier | None = None) -> Stage:
    """Install identity; ``verifier`` is where on-chain account verification plugs in.

    Must be called after the database and Redis contexts are installed: its own
    startup uses both.
    """
    add_routes(app)
    app.cleanup_ctx.append(_sessions(verifier or EoaVerifier()))
    return IdentityStage()


def _sessions(verifier: AuthorizationVerifier
              ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        # Reading (or creating) the state-dir secret is file I/O: off the loop.
        keys = await asyncio.to_thread(load_token_keys, settings)
        leeway_s = settings.authorize_clock_skew_s
        app[SESSIONS] = Sessions(
            settings,
            codec=TokenCodec(keys, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
                             leeway_s=leeway_s),
            store=SessionStore(app[DATABASE]),
            revocations=RevocationList(app[REDIS], leeway_s=leeway_s),
            cache=SessionAccountCache(),
            verifier=verifier,
        )
        yield

    return context
