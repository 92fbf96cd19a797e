"""Automatic pipelining: hot-path Redis commands of concurrent requests share a round trip.

Every chat call reads its session's revocation key and runs the token-bucket
script. Sent one by one, each command costs a pool checkout, a write, a read and
redis-py's bookkeeping, and under load that CPU is most of what Redis costs us.
So the commands go through a ``RedisBatcher``: a command issued while no
pipeline is in flight starts one at the loop's next turn, taking every command
queued by then; commands issued while a pipeline is in flight go in the next
one. Alone, a command waits for
exactly one round trip; under load, a round trip carries everything that arrived
during the previous one. This is group
commit (``app.ledger.group_commit``) for Redis, as ioredis calls it
"auto-pipelining".

A command nobody waits for (a rate-limit correction after the answer) may be
sent lazily (``within_s``): it rides with the next command that is sent at once,
or goes on its own after that delay. At concurrency 1 the correction of one call
then shares the next call's round trip instead of costing one of its own, and
each round trip costs a wake-up of Redis and of us.

The pipeline is not a transaction: each command is atomic on its own (a script
is one command), and one command's error is its caller's alone.

The batcher keeps one connection of the client's pool for itself and writes each
batch on it in the step that takes the batch. Going through redis-py's pipeline
object cost a pool checkout per round trip (with a zero-timeout read to check the
connection, one loop turn) and a task per write (``asyncio.wait_for`` on Python
3.11, another turn): at the start of a call, the turns in which the rest of the
call ran were spent before the command even left. A round trip is bounded by
``ROUND_TRIP_TIMEOUT_S`` here instead of redis-py's socket timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.storage.redis_client import REDIS_TIMEOUT_S

# Commands per pipeline: bounded so one round trip stays short.
MAX_PIPELINE_COMMANDS = 1_000
# The longest one round trip (write a batch, read its replies) may take.
ROUND_TRIP_TIMEOUT_S = REDIS_TIMEOUT_S


class RedisBatcher:
    """Sends the commands of concurrent callers in shared pipelines, one at a time."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None
        # The timer that sends lazy commands when no other command took them along.
        self._timer: asyncio.TimerHandle | None = None
        # The pool connection the batcher writes on (None until needed, or after an
        # error), and the socket timeout it came with, restored when it goes back.
        self._connection: AbstractConnection | None = None
        self._pool_socket_timeout: float | None = None
        self.pipelines_sent = 0

    async def execute(self, *command: Any) -> Any:
        """Run one command in the next pipeline; its reply, or its error raised here."""
        return await self.submit(*command)

    def submit(self, *command: Any, within_s: float = 0.0) -> asyncio.Future[Any]:
        """Queue one command for the next pipeline now; the future holds its reply or error.

        With ``within_s`` the command waits up to that long for another to go with.
        The caller must await the future (an unread error is logged by asyncio).
        """
        assert within_s >= 0
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((command, future))
        if within_s == 0:
            self._start()
        elif self._sender is None and self._timer is None:
            self._timer = loop.call_later(within_s, self._on_timer)
        return future

    def _on_timer(self) -> None:
        self._timer = None
        self._start()

    def _start(self) -> None:
        if self._sender is None and self._queue:
            self._sender = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:MAX_PIPELINE_COMMANDS]
                del self._queue[:MAX_PIPELINE_COMMANDS]
                await self._send_one(batch)
        finally:
            self._sender = None

    async def _send_one(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        # Callers that gave up (their timeout) are not sent.
        batch = [(command, future) for command, future in batch if not future.done()]
        if not batch:
            return
        try:
            replies = await self._round_trip([command for command, _ in batch])
        except BaseException as error:
            # The whole round trip failed (connection, timeout, cancellation): every
            # caller in it gets the error, and the next pipeline starts afresh on a
            # fresh connection (a half-read reply would answer the wrong command).
            await self._drop_connection()
            for _, future in batch:
                if not future.done():
                    future.set_exception(error if isinstance(error, Exception)
                                         else ConnectionError("redis pipeline cancelled"))
            if not isinstance(error, Exception):
                raise
            return
        self.pipelines_sent += 1
        assert len(replies) == len(batch), "one reply per command"
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Write the commands at once, then read one reply (or error) per command."""
        connection = await self._connected()
        replies: list[Any] = []
        try:
            async with asyncio.timeout(ROUND_TRIP_TIMEOUT_S):
                await connection.send_packed_command(connection.pack_commands(commands),
                                                     check_health=False)
                for _ in commands:
                    try:
                        replies.append(await connection.read_response())
                    except ResponseError as error:
                        replies.append(error)  # That command's alone; the rest read on.
        except TimeoutError:
            raise RedisTimeoutError("redis did not answer in time") from None
        return replies

    async def _connected(self) -> AbstractConnection:
        if self._connection is None:
            connection = await self.client.connection_pool.get_connection()
            # Our deadline bounds the round trip: without a socket timeout redis-py
            # writes in this task instead of a new one.
            self._pool_socket_timeout = connection.socket_timeout
            connection.socket_timeout = None
            self._connection = connection
        return self._connection

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.socket_timeout = self._pool_socket_timeout
        await connection.disconnect(nowait=True)
        await self.client.connection_pool.release(connection)

    async def close(self) -> None:
        """Give the connection back to the pool (commands still queued are sent first)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._start()
        while self._sender is not None:
            await self._sender
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.socket_timeout = self._pool_socket_timeout
            await self.client.connection_pool.release(connection)

