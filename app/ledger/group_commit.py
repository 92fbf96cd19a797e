"""Group commit: many requests' writes share one statement and one commit.

Every chat call writes to the ledger twice (its hold, then its record). Writing
each alone costs a round trip, a commit and a turn at the account row's lock
per request; under load, requests would queue for that lock one by one. So each
kind of write has a single writer task: it takes everything queued while its
previous statement was committing, writes it as one statement, and wakes each
request with its own result. Under load a batch grows with the commit latency;
alone, a request waits for exactly one statement. No timer delays anyone.

A failed batch is retried (every batch statement is idempotent by request id);
after the last attempt every request in it gets the failure. The writer task
outlives any exception: if it died, every request after it would wait forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

W = TypeVar("W")
R = TypeVar("R")

WriteBatch = Callable[[Sequence[W]], Awaitable[Sequence[R]]]


class GroupCommitter(Generic[W, R]):
    """One writer task turning queued writes into batch statements."""

    def __init__(
        self,
        name: str,
        write_batch: WriteBatch[W, R],
        failure: Callable[[], Exception],
        *,
        max_batch: int,
        max_queued: int,
        attempts: int,
        retry_delay_s: float,
    ) -> None:
        assert max_batch >= 1 and max_queued >= max_batch and attempts >= 1
        self.name = name
        self.write_batch = write_batch
        self.failure = failure
        self.max_batch = max_batch
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.queue: asyncio.Queue[tuple[W, asyncio.Future[R]]] = asyncio.Queue(max_queued)
        self.task: asyncio.Task[None] | None = None
        self.batches_written = 0
        self.writes_done = 0

    def start(self) -> None:
        assert self.task is None, "started twice"
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        if self.task is None:
            return
        await self.queue.join()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None

    async def submit(self, write: W) -> R:
        """Queue one write (waiting for room when the queue is full); wait for its commit."""
        assert self.task is not None, f"the {self.name} writer is not running"
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self.queue.put((write, future))
        return await future

    def submit_nowait(self, write: W) -> bool:
        """Queue a write nobody waits for; False when the queue is full (nothing queued)."""
        assert self.task is not None, f"the {self.name} writer is not running"
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # Nobody awaits it: read its failure here so it is not reported as lost.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            self.queue.put_nowait((write, future))
        except asyncio.QueueFull:
            return False
        return True

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._write_with_retries(batch)
            except Exception:
                log.exception("the %s writer failed a batch", self.name)
                self._fail(batch)
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _write_with_retries(self, batch: list[tuple[W, asyncio.Future[R]]]) -> None:
        writes = [write for write, _ in batch]
        for attempt in range(1, self.attempts + 1):
            try:
                results = await self.write_batch(writes)
                break
            except Exception as error:
                # Any failure (asyncpg raises more than PostgresError and
                # InterfaceError on a broken connection) is retried on a fresh
                # connection; the last one is the answer.
                log.error("%s write failed (attempt %d/%d): %s: %s", self.name, attempt,
                          self.attempts, type(error).__name__, error)
                if attempt == self.attempts:
                    self._fail(batch)
                    return
                await asyncio.sleep(self.retry_delay_s * attempt)
        assert len(results) == len(batch), "one result per write"
        self.batches_written += 1
        self.writes_done += len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _fail(self, batch: list[tuple[W, asyncio.Future[R]]]) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(self.failure())
