"""Fixtures of the limits tests: a roomy Redis client, fresh bucket owners, dead Redis URLs."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry, Counter

from app.limits.limiter import Limiter, OnRedisError
from app.limits.token_buckets import TokenBuckets
from app.storage.redis_client import create_redis


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.Redis]:
    # The production client, settings included: its pool and timeouts are under test too.
    client = create_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def buckets(redis_client: redis.Redis) -> TokenBuckets:
    # These tests are about the script's arithmetic: a generous call budget keeps a loaded
    # machine from turning them into timeout tests (test_stage tests the real budget).
    return TokenBuckets(redis_client, call_timeout_s=10.0)


@pytest.fixture
def owner() -> str:
    """A hash tag no other test uses, so every test starts from full buckets."""
    return f"test:{secrets.token_hex(6)}"


def refusal_counter() -> Counter:
    return Counter("tollgate_rate_limited", "test", ["limit"], registry=CollectorRegistry())


def make_limiter(client: redis.Redis, on_redis_error: OnRedisError = "closed") -> Limiter:
    token_buckets = TokenBuckets(client)
    return Limiter(
        lambda: token_buckets, on_redis_error=on_redis_error, refusals=refusal_counter()
    )


def closed_tcp_url() -> str:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


MISSING_SOCKET_URL = "unix:///tmp/tollgate-no-such-dir/redis.sock"


@pytest.fixture
async def silent_redis_url() -> AsyncIterator[str]:
    """A server that accepts connections and never answers: only our timeout ends a call."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


