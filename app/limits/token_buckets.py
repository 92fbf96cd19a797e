"""Token buckets in Redis: one atomic script, one round trip for every bucket of a call.

The script (``token_bucket.lua``, beside this module) documents its contract and
its integer arithmetic. Time is Redis ``TIME`` read inside the script, so every
process of every machine agrees on it. Lower-level failures (connection refused,
timeouts, server errors) become ``LimiterUnavailable`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from app.limits.bucket_keys import hash_tag
from app.storage.redis_batch import RedisBatcher

SCRIPT_SOURCE = resources.files("app.limits").joinpath("token_bucket.lua").read_text("utf-8")
MINUTE_MS = 60_000
# Below Redis's own 2 s socket timeout: a limiter that cannot answer in time is treated
# as down, so a sick Redis adds at most this much to a request. Not tighter: on a loaded
# 2-core host a healthy Redis call can wait a few hundred ms for the event loop, and
# fail-closed would turn that into 503s.
CALL_TIMEOUT_S = 1.0
# A correction waits this long for a call's commands to share a round trip with.
CORRECTION_SEND_WITHIN_S = 0.005
# The script stores a level of capacity * period ticks in a double; staying under
# 2^51 keeps it, and a debt of the same size, exact (doubles are exact to 2^53).
TICKS_MAX = 2**51

_ADMITTED, _REFUSED, _TOO_LARGE = 1, 0, -1
_FIELDS_PER_STATE = 4


class LimiterUnavailable(Exception):
    """Redis did not answer the limiter in time, or answered with an error."""


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket touched by one call: ``capacity_tokens`` refill every ``period_ms``.

    ``amount_tokens`` is the cost when acquiring (>= 0) and the signed correction
    when adjusting (positive gives tokens back).
    """

    key: str
    capacity_tokens: int
    amount_tokens: int
    period_ms: int = MINUTE_MS

    def __post_init__(self) -> None:
        assert self.capacity_tokens >= 1, f"bucket {self.key}: capacity must be >= 1"
        assert self.period_ms >= 1, f"bucket {self.key}: period must be >= 1 ms"
        assert self.capacity_tokens * self.period_ms <= TICKS_MAX, "capacity too large"
        # An adjustment may move a level across the whole range [-capacity, capacity].
        assert abs(self.amount_tokens) * self.period_ms <= 2 * TICKS_MAX, "amount too large"


@dataclass(frozen=True, slots=True)
class BucketState:
    """A bucket after one step. ``remaining_tokens`` is negative while in debt.

    ``retry_ms``: 0 when the bucket held the cost, else the wait until it will
    (-1: never, the cost exceeds the capacity).
    """

    limit_tokens: int
    remaining_tokens: int
    reset_ms: int
    retry_ms: int

    @property
    def lacking(self) -> bool:
        return self.retry_ms != 0

    @property
    def cost_exceeds_capacity(self) -> bool:
        return self.retry_ms < 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to one acquire: every bucket debited, or none."""

    admitted: bool
    states: tuple[BucketState, ...]

    @property
    def cost_exceeds_capacity(self) -> bool:
        return any(state.cost_exceeds_capacity for state in self.states)

    @property
    def retry_after_ms(self) -> int:
        """The wait until every bucket holds its cost (0 when admitted)."""
        assert not self.cost_exceeds_capacity, "no wait helps a cost above capacity"
        return max(state.retry_ms for state in self.states)


class TokenBuckets:
    """The bucket script bound to one Redis client."""

    def __init__(self, client: redis.Redis, *, call_timeout_s: float = CALL_TIMEOUT_S,
                 batcher: RedisBatcher | None = None) -> None:
        self.client = client
        self.call_timeout_s = call_timeout_s
        # Calls of concurrent requests share round trips (app.storage.redis_batch).
        self.batcher = batcher or RedisBatcher(client)
        assert self.batcher.client is client, "the batcher sends on this client"
        self.script_sha = hashlib.sha1(SCRIPT_SOURCE.encode("utf-8")).hexdigest()

    async def acquire(self, buckets: Sequence[Bucket]) -> Verdict:
        """Debit every bucket's cost, or none of them if any lacks tokens."""
        return await self.start_acquire(buckets)

    def start_acquire(self, buckets: Sequence[Bucket]) -> Coroutine[Any, Any, Verdict]:
        """Send the acquire now (in the next pipeline); the coroutine waits for the verdict.

        The caller must await it: the command is on its way whether or not it does.
        """
        assert all(bucket.amount_tokens >= 0 for bucket in buckets), "a cost is never negative"
        command = self._command("acquire", buckets)
        return self._verdict(self.batcher.submit(*command), command, buckets)

    async def adjust(self, buckets: Sequence[Bucket]) -> tuple[BucketState, ...]:
        """Add each bucket's signed amount; levels stay within [-capacity, capacity]."""
        command = self._command("adjust", buckets)
        # Nobody waits for a correction: it goes with the next call's commands.
        sent = self.batcher.submit(*command, within_s=CORRECTION_SEND_WITHIN_S)
        status, states = await self._reply(sent, command, buckets)
        assert status == _ADMITTED and not any(state.lacking for state in states)
        return states

    async def _verdict(
        self, sent: asyncio.Future[Any], command: tuple[Any, ...], buckets: Sequence[Bucket]
    ) -> Verdict:
        status, states = await self._reply(sent, command, buckets)
        verdict = Verdict(status == _ADMITTED, states)
        assert verdict.admitted == (not any(state.lacking for state in states))
        assert (status == _TOO_LARGE) == verdict.cost_exceeds_capacity
        return verdict

    def _command(self, operation: str, buckets: Sequence[Bucket]) -> tuple[Any, ...]:
        assert buckets, "a call touches at least one bucket"
        # One slot for all keys: the script is one atomic step on Redis Cluster too.
        assert len({hash_tag(bucket.key) for bucket in buckets}) == 1, "keys span hash slots"
        arguments: list[str | int] = [operation]
        for bucket in buckets:
            arguments += [bucket.capacity_tokens, bucket.period_ms, bucket.amount_tokens]
        return ("EVALSHA", self.script_sha, len(buckets),
                *(bucket.key for bucket in buckets), *arguments)

    async def _reply(
        self, sent: asyncio.Future[Any], command: tuple[Any, ...], buckets: Sequence[Bucket]
    ) -> tuple[int, tuple[BucketState, ...]]:
        try:
            async with asyncio.timeout(self.call_timeout_s):
                try:
                    reply = await sent
                except NoScriptError:
                    # A restarted (or flushed) Redis forgot the script: load it, go on.
                    await self.client.script_load(SCRIPT_SOURCE)
                    reply = await self.batcher.execute(*command)
        except (RedisError, OSError, TimeoutError) as error:
            raise LimiterUnavailable(f"{type(error).__name__}: {error}") from error
        return _parse_reply(reply, buckets)


def _parse_reply(reply: object, buckets: Sequence[Bucket]) -> tuple[int, tuple[BucketState, ...]]:
    assert isinstance(reply, list), f"unexpected script reply {reply!r}"
    assert len(reply) == 1 + _FIELDS_PER_STATE * len(buckets), f"bad reply length {reply!r}"
    assert all(isinstance(value, int) for value in reply), f"non-integer reply {reply!r}"
    status = reply[0]
    assert status in (_ADMITTED, _REFUSED, _TOO_LARGE), f"unknown status {status}"
    states = []
    for index, bucket in enumerate(buckets):
        start = 1 + index * _FIELDS_PER_STATE
        state = BucketState(*reply[start : start + _FIELDS_PER_STATE])
        assert state.limit_tokens == bucket.capacity_tokens
        assert -state.limit_tokens <= state.remaining_tokens <= state.limit_tokens
        assert 0 <= state.reset_ms <= 2 * bucket.period_ms
        assert state.retry_ms >= -1
        states.append(state)
    return status, tuple(states)
