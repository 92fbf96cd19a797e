"""A process that hammers one bucket with concurrent acquires (run by the two-process test).

Kept apart from the test module so a spawned child imports only what it needs.
"""

from __future__ import annotations

import asyncio
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import redis.asyncio as redis

from app.limits.token_buckets import Bucket, TokenBuckets

# Generous: this test is about exactness across processes, not about timeouts.
CALL_TIMEOUT_S = 5.0


def hammer(
    url: str, bucket: Bucket, attempts: int, concurrency: int, start: Barrier,
    results: Queue[tuple[int, int]],
) -> None:
    """Put (admitted, refused) for ``attempts`` acquires of ``bucket`` on ``results``."""
    results.put(asyncio.run(_hammer(url, bucket, attempts, concurrency, start)))


async def _hammer(
    url: str, bucket: Bucket, attempts: int, concurrency: int, start: Barrier
) -> tuple[int, int]:
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=concurrency, timeout=5)
    client = redis.Redis(connection_pool=pool)
    buckets = TokenBuckets(client, call_timeout_s=CALL_TIMEOUT_S)
    await client.ping()
    remaining = [attempts]
    counts = [0, 0]

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            verdict = await buckets.acquire([bucket])
            counts[0 if verdict.admitted else 1] += 1

    # Both processes are connected and ready: start hammering together.
    start.wait()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.aclose()
    return counts[0], counts[1]
