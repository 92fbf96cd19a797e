"""The aiohttp application: resources, middlewares and routes, in one visible order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from eth_account import Account

from app.admin.setup import setup_admin
from app.chain.client import ChainClient
from app.chain.config import ChainConfig
from app.chain.errors import ChainError
from app.chain.operator import OperatorWallet
from app.config.catalog import Catalog
from app.config.settings import Settings
from app.http.errors import error_middleware
from app.http.keys import (
    CATALOG,
    CHAIN,
    DATABASE,
    FORWARDER,
    HTTP_CLIENT,
    METRICS,
    OPERATOR,
    PIPELINE,
    REDIS,
    REDIS_BATCHER,
    SETTINGS,
)
from app.http.metrics import Metrics
from app.http.request_context import add_request_headers
from app.http.routes import chat, health, models
from app.identity.setup import setup_identity
from app.ledger.setup import setup_ledger
from app.limits.setup import setup_limits
from app.payments.setup import setup_payments
from app.proxy.forward import Forwarder
from app.proxy.http_client import UpstreamClient
from app.proxy.pipeline import Pipeline, Stage
from app.settlement.setup import setup_settlement
from app.storage.database import create_engine
from app.storage.redis_batch import RedisBatcher
from app.storage.redis_client import create_redis

# Upstream connection pool: bounded, with keep-alive so a request rarely pays a handshake.
UPSTREAM_CONNECTIONS_PER_ORIGIN_MAX = 512
UPSTREAM_KEEPALIVE_S = 30.0


@dataclass(frozen=True, slots=True)
class Backends:
    """Where the shared state lives (resolved URLs, embedded or not)."""

    database_url: str
    redis_url: str
    # None: no chain (wallet sessions for EOAs only, no on-chain settlement).
    chain: ChainConfig | None = None


def create_app(settings: Settings, catalog: Catalog, backends: Backends) -> web.Application:
    # The error middleware is outermost and gives each request its id first, so every
    # later failure, even an unexpected one, carries one.
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[CATALOG] = catalog
    metrics = Metrics()
    app[METRICS] = metrics
    app.on_response_prepare.append(add_request_headers)
    app.on_response_prepare.append(metrics.count_response)
    # Shared resources first: every concern below may use them at startup.
    app.cleanup_ctx.append(_database(backends.database_url))
    app.cleanup_ctx.append(_redis(backends.redis_url))
    if backends.chain is not None:
        app.cleanup_ctx.append(_chain(backends.chain))

    # Each concern installs its routes, middlewares and resources, and returns its stage.
    # Stage order is the pipeline order: authenticate -> rate-limit -> reserve/record.
    # Metrics come first so they settle last and see every call, refused or not.
    stages: list[Stage] = [
        metrics,
        setup_identity(app, chain=backends.chain),
        setup_limits(app),
    ]
    # A payment the request carries is credited before the ledger applies the balance rule.
    payments = setup_payments(app, backends.chain)
    if payments is not None:
        stages.append(payments)
    stages.append(setup_ledger(app))
    app[PIPELINE] = Pipeline(stages)
    app.cleanup_ctx.append(_upstream_client)
    app.on_shutdown.append(_drain_settlements)
    setup_admin(app, chain=backends.chain)
    setup_settlement(app, chain=backends.chain)

    app.router.add_post("/v1/chat/completions", chat.chat_completions)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1/models/{model_id}", models.get_model)
    app.router.add_get("/health/live", health.live)
    app.router.add_get("/health/ready", health.ready)
    app.router.add_get("/metrics", metrics.handle)
    return app


def _database(url: str):  # type: ignore[no-untyped-def]
    async def context(app: web.Application) -> AsyncIterator[None]:
        engine = create_engine(url)
        app[DATABASE] = engine
        yield
        await engine.dispose()

    return context


def _redis(url: str):  # type: ignore[no-untyped-def]
    async def context(app: web.Application) -> AsyncIterator[None]:
        client = create_redis(url)
        app[REDIS] = client
        batcher = RedisBatcher(client)
        app[REDIS_BATCHER] = batcher
        yield
        await batcher.close()
        await client.aclose()

    return context


class ChainUnavailableAtStart(RuntimeError):
    """The configured chain could not be used at start (node down, or another chain id)."""


def _chain(config: ChainConfig):  # type: ignore[no-untyped-def]
    async def context(app: web.Application) -> AsyncIterator[None]:
        try:
            client = await ChainClient.connect(config.rpc_url, config.chain_id,
                                               call_timeout_s=config.call_timeout_s)
        except ChainError as error:
            # The RPC URL is not named: hosted RPC URLs carry API keys.
            raise ChainUnavailableAtStart(
                f"chain {config.chain_id}: cannot use its RPC node at start"
                f" ({type(error).__name__}: {error})"
            ) from None
        app[CHAIN] = client
        if config.operator_private_key is not None:
            # One wallet per process: every concern that sends the operator's
            # transactions shares its nonce sequence (two would clash).
            app[OPERATOR] = OperatorWallet(client, Account.from_key(config.operator_private_key))
        yield
        await client.close()

    return context


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    client = UpstreamClient(
        connections_per_origin=UPSTREAM_CONNECTIONS_PER_ORIGIN_MAX,
        keepalive_s=UPSTREAM_KEEPALIVE_S,
        user_agent="tollgate",
    )
    app[HTTP_CLIENT] = client
    app[FORWARDER] = Forwarder(
        client,
        app[PIPELINE],
        keepalive_s=app[SETTINGS].stream_keepalive_s,
        on_failure=app[METRICS].upstream_failed,
    )
    yield
    await client.close()


async def _drain_settlements(app: web.Application) -> None:
    await app[PIPELINE].drain()
