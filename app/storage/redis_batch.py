"""Automatic pipelining: hot-path Redis commands of concurrent requests share a round trip.

Every chat call reads its session's revocation key and runs the token-bucket
script. Sent one by one, each command costs a pool checkout, a write, a read and
redis-py's bookkeeping, and under load that CPU is most of what Redis costs us.
So the commands go through a ``RedisBatcher``: a command issued while no
pipeline is in flight starts one at the loop's next turn, taking every command
queued by then; commands issued while a pipeline is in flight go in the next
one. Alone, a command waits for exactly one round trip; under load, a round
trip carries everything that arrived during the previous one. This is group
commit (``app.ledger.group_commit``) for Redis, as ioredis calls it
"auto-pipelining".

A command nobody waits for (a rate-limit correction after the answer) may be
sent lazily (``within_s``): it rides with the next command that is sent at once,
or goes on its own after that delay. At concurrency 1 the correction of one call
then shares the next call's round trip instead of costing one of its own, and
each round trip costs a wake-up of Redis and of us.

The pipeline is not a transaction: each command is atomic on its own (a script
is one command), and one command's error is its caller's alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis

# Commands per pipeline: bounded so one round trip stays short.
MAX_PIPELINE_COMMANDS = 1_000


class RedisBatcher:
    """Sends the commands of concurrent callers in shared pipelines, one at a time."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None
        # The timer that sends lazy commands when no other command took them along.
        self._timer: asyncio.TimerHandle | None = None
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
            async with self.client.pipeline(transaction=False) as pipeline:
                for command, _ in batch:
                    pipeline.execute_command(*command)
                replies = await pipeline.execute(raise_on_error=False)
        except BaseException as error:
            # The whole round trip failed (connection, timeout, cancellation): every
            # caller in it gets the error, and the next pipeline starts afresh.
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
