"""Typed keys for what the application shares between handlers (no globals)."""

from __future__ import annotations

import redis.asyncio as redis
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chain.client import ChainClient
from app.chain.operator import OperatorWallet
from app.config.catalog import Catalog
from app.config.settings import Settings
from app.http.metrics import Metrics
from app.proxy.forward import Forwarder
from app.proxy.http_client import UpstreamClient
from app.proxy.pipeline import Pipeline
from app.storage.redis_batch import RedisBatcher

SETTINGS = web.AppKey("settings", Settings)
CATALOG = web.AppKey("catalog", Catalog)
METRICS = web.AppKey("metrics", Metrics)
PIPELINE = web.AppKey("pipeline", Pipeline)
HTTP_CLIENT = web.AppKey("http_client", UpstreamClient)
FORWARDER = web.AppKey("forwarder", Forwarder)
DATABASE = web.AppKey("database", AsyncEngine)
REDIS = web.AppKey("redis", redis.Redis)
# Hot-path commands (revocation checks, bucket scripts) of concurrent requests share
# round trips: at concurrency 1 a request makes one Redis round trip, not one per use.
REDIS_BATCHER = web.AppKey("redis_batcher", RedisBatcher)
# The one chain client (only with a chain configured): identity, settlement and x402 share it.
CHAIN = web.AppKey("chain", ChainClient)
# The operator's transaction sender, when a chain with an operator key is configured.
OPERATOR = web.AppKey("operator", OperatorWallet)
