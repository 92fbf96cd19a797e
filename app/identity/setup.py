"""Installs the identity concern: its resources, its routes, and its pipeline stage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from app.chain.config import ChainConfig
from app.config.settings import Settings
from app.http.keys import CHAIN, DATABASE, METRICS, REDIS, REDIS_BATCHER, SETTINGS
from app.identity.account_cache import SessionAccountCache
from app.identity.authenticate import IdentityStage
from app.identity.chain_verifier import ChainVerifier
from app.identity.revocation_feed import RevocationFeed
from app.identity.revocation_list import RevocationList
from app.identity.routes import add_routes
from app.identity.session_policy import SessionPolicies, chain_policy_reader
from app.identity.session_store import SessionStore
from app.identity.sessions import SESSIONS, Sessions
from app.identity.token_keys import load_token_keys
from app.identity.tokens import TokenCodec
from app.identity.verifier import AuthorizationVerifier, EoaVerifier, PerChainVerifier
from app.proxy.pipeline import Stage

log = logging.getLogger(__name__)


def setup_identity(app: web.Application, *, chain: ChainConfig | None = None) -> Stage:
    """Install identity; with ``chain``, smart accounts on that chain are verified on it.

    Must be called after the database and Redis contexts (and, with a chain, the
    chain client's) are installed: its own startup uses them.
    """
    add_routes(app)
    app.cleanup_ctx.append(_sessions(chain))
    return IdentityStage()


def _sessions(chain: ChainConfig | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        # Reading (or creating) the state-dir secret is file I/O: off the loop.
        keys = await asyncio.to_thread(load_token_keys, settings)
        leeway_s = settings.authorize_clock_skew_s
        verifier: AuthorizationVerifier = EoaVerifier()
        policies = None
        if chain is not None:
            policies = _policies(app, chain, settings)
            verifier = _chain_verifier(app, chain, policies, settings)
        cache = SessionAccountCache()
        feed_live = app[METRICS].revocation_feed_live
        feed = RevocationFeed(app[REDIS], cache,
                              lambda live: feed_live.inc() if live else feed_live.dec())
        app[SESSIONS] = Sessions(
            settings,
            codec=TokenCodec(keys, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
                             leeway_s=leeway_s),
            store=SessionStore(app[DATABASE]),
            revocations=RevocationList(app[REDIS], leeway_s=leeway_s,
                                       batcher=app[REDIS_BATCHER]),
            cache=cache,
            verifier=verifier,
            policies=policies,
            feed=feed,
        )
        feed.start()
        yield
        await feed.stop()
        await app[SESSIONS].close()

    return context


def _policies(app: web.Application, chain: ChainConfig, settings: Settings) -> SessionPolicies:
    return SessionPolicies(
        chain_policy_reader(app[CHAIN]), chain_id=chain.chain_id,
        settlement=chain.settlement, token=chain.token,
        fresh_s=settings.session_policy_cache_s,
    )


def _chain_verifier(app: web.Application, chain: ChainConfig, policies: SessionPolicies,
                    settings: Settings) -> AuthorizationVerifier:
    """Smart accounts on the configured chain; EOAs only on the other supported chains.

    Only the chain Tollgate reads can prove who owns an account, so an Authorization
    for another chain id in ``chain_ids`` keeps today's rule: ``smartAccount == wallet``.
    """
    if chain.chain_id not in settings.chain_ids:
        log.warning("chain %d is not in TOLLGATE_CHAIN_IDS: no wallet can authorize on it,"
                    " so smart accounts cannot sign in", chain.chain_id)
    on_chain = ChainVerifier(
        app[CHAIN], settlement=chain.settlement, token=chain.token,
        factory_allowlist=set(chain.account_factories), policies=policies,
    )
    return PerChainVerifier({chain.chain_id: on_chain}, default=EoaVerifier())
