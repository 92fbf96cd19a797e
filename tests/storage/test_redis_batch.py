"""Automatic pipelining against the embedded Redis: shared round trips, separate fates."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from app.limits.token_buckets import Bucket, TokenBuckets
from app.storage.redis_batch import RedisBatcher
from app.storage.redis_client import create_redis
from tests.limits.conftest import closed_tcp_url


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


def key() -> str:
    return f"test:batch:{secrets.token_hex(6)}"


async def test_concurrent_commands_share_pipelines_and_keep_their_order(
    client: redis.Redis,
) -> None:
    batcher = RedisBatcher(client)
    counter = key()
    replies = await asyncio.gather(*(batcher.execute("INCR", counter) for _ in range(200)))
    assert sorted(replies) == list(range(1, 201)), "every command ran exactly once"
    assert replies == list(range(1, 201)), "in the order they were issued"
    assert batcher.pipelines_sent < 20, "concurrent commands shared round trips"
    assert int(await client.get(counter)) == 200


async def test_a_command_alone_is_sent_at_once(client: redis.Redis) -> None:
    batcher = RedisBatcher(client)
    name = key()
    await batcher.execute("SET", name, "v")
    assert await batcher.execute("GET", name) == b"v"
    assert batcher.pipelines_sent == 2


async def test_a_lazy_command_rides_with_the_next_one_sent(client: redis.Redis) -> None:
    batcher = RedisBatcher(client)
    name = key()
    lazy = batcher.submit("INCR", name, within_s=60.0)
    await asyncio.sleep(0)  # A turn of the loop: an eager command would have left by now.
    assert batcher.pipelines_sent == 0 and not lazy.done()
    assert await batcher.execute("GET", name) == b"1", "sent first, in the same pipeline"
    assert await lazy == 1
    assert batcher.pipelines_sent == 1


async def test_a_lazy_command_alone_leaves_after_its_delay(client: redis.Redis) -> None:
    batcher = RedisBatcher(client)
    name = key()
    assert await batcher.submit("INCR", name, within_s=0.01) == 1
    assert batcher.pipelines_sent == 1


async def test_close_sends_what_is_queued(client: redis.Redis) -> None:
    batcher = RedisBatcher(client)
    name = key()
    lazy = batcher.submit("INCR", name, within_s=60.0)
    await batcher.close()
    assert lazy.done() and lazy.result() == 1


async def test_a_killed_connection_fails_its_round_trip_and_is_replaced(
    client: redis.Redis,
) -> None:
    """The batcher keeps one connection: when Redis drops it, the next round trip
    fails (never answers from a half-read reply) and the one after runs on a new one."""
    batcher = RedisBatcher(client)
    first_id = await batcher.execute("CLIENT", "ID")
    assert await batcher.execute("CLIENT", "ID") == first_id, "one connection kept"
    assert await client.client_kill_filter(_id=first_id) == 1
    with pytest.raises(RedisError):
        await batcher.execute("CLIENT", "ID")
    second_id = await batcher.execute("CLIENT", "ID")
    assert second_id != first_id
    await batcher.close()


async def test_one_commands_error_is_its_callers_alone(client: redis.Redis) -> None:
    batcher = RedisBatcher(client)
    text, number = key(), key()
    await client.set(text, "not a number")
    results = await asyncio.gather(
        batcher.execute("INCR", number), batcher.execute("INCR", text),
        batcher.execute("INCR", number), return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)


async def test_a_caller_that_gave_up_does_not_disturb_the_others(client: redis.Redis) -> None:
    batcher = RedisBatcher(client)
    counter = key()
    impatient = asyncio.ensure_future(batcher.execute("INCR", counter))
    impatient.cancel()
    assert await batcher.execute("INCR", counter) == 1, "the cancelled command was not sent"
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_an_unreachable_redis_fails_every_caller_and_then_recovers() -> None:
    client = redis.Redis.from_url(closed_tcp_url(), socket_connect_timeout=1.0)
    batcher = RedisBatcher(client)
    try:
        results = await asyncio.gather(*(batcher.execute("PING") for _ in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(result, (ConnectionError, OSError, redis.ConnectionError))
                   for result in results), results
        # Nothing is stuck: the next command starts a new pipeline (and fails the same way).
        with pytest.raises((ConnectionError, OSError, redis.ConnectionError)):
            await batcher.execute("PING")
    finally:
        await client.aclose()


async def test_the_bucket_script_is_reloaded_after_redis_forgot_it(client: redis.Redis) -> None:
    buckets = TokenBuckets(client, call_timeout_s=10.0)
    bucket = Bucket(f"tg:{{{key()}}}:requests", 10, 1)
    assert (await buckets.acquire([bucket])).admitted
    await client.script_flush()
    verdict = await buckets.acquire([bucket])
    assert verdict.admitted and verdict.states[0].remaining_tokens == 8
    assert await client.script_exists(buckets.script_sha) == [True]
