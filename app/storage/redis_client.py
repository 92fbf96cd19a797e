"""The Redis client: one pool per process, explicit timeouts."""

from __future__ import annotations

import redis.asyncio as redis

REDIS_TIMEOUT_S = 2.0
REDIS_MAX_CONNECTIONS = 64


def create_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        max_connections=REDIS_MAX_CONNECTIONS,
        decode_responses=False,
    )
