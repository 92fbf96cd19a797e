"""The Redis client: one pool per process, explicit timeouts."""

from __future__ import annotations

import redis.asyncio as redis

REDIS_TIMEOUT_S = 2.0
REDIS_MAX_CONNECTIONS = 64


def create_redis(url: str) -> redis.Redis:
    # A blocking pool: past max_connections a command waits for a free connection
    # (up to the timeout) instead of failing, so a burst of calls is served, not 503'd.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=REDIS_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        decode_responses=False,
    )
    # from_pool: the client owns its pool, so aclose() closes every connection.
    return redis.Redis.from_pool(pool)
