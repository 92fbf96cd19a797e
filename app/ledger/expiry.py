"""Expiry: holds left behind by crashed processes are voided after their lifetime.

Every process runs one sweeper. Each sweep deletes expired holds and subtracts
them from their accounts' ``held_micros`` in one statement, so an expired hold
is released exactly once whichever process, or a late settlement, reaches it
first: a hold row can be deleted only once, and only the deleting statement
subtracts its amount. ``SKIP LOCKED`` lets sweepers in several processes share
the work instead of waiting on each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage import driver
from app.storage.tables import accounts, holds

log = logging.getLogger(__name__)

# Expired holds only keep credit from being used; a few seconds' delay costs nothing.
SWEEP_INTERVAL_S = 5.0
# Holds released per statement, and statements per sweep: a bounded amount of work.
SWEEP_BATCH_HOLDS = 1_000
SWEEP_BATCHES_MAX = 10

SWEEP_EXPIRED = f"""
WITH expired AS (
    DELETE FROM {holds.name}
    WHERE request_id IN (
        SELECT request_id FROM {holds.name} WHERE expires_at <= now()
        ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
    )
    RETURNING account_id, amount_micros
), released AS (
    SELECT account_id, sum(amount_micros)::bigint AS total, count(*) AS holds
    FROM expired GROUP BY account_id
), updated AS (
    UPDATE {accounts.name} AS account
    SET held_micros = account.held_micros - released.total
    FROM released
    WHERE account.id = released.account_id
    RETURNING account.id
)
SELECT coalesce(sum(holds), 0)::bigint AS released FROM released
"""


async def sweep_expired_holds(engine: AsyncEngine) -> int:
    """Void every hold whose lifetime has passed; return how many."""
    released = 0
    for _ in range(SWEEP_BATCHES_MAX):
        rows = await driver.fetch(engine, SWEEP_EXPIRED, SWEEP_BATCH_HOLDS)
        count = int(rows[0]["released"])
        released += count
        if count < SWEEP_BATCH_HOLDS:
            break
    if released:
        # A hold expires only when its process died or wedged: worth a look.
        log.warning("released %d expired holds", released)
    return released


class HoldSweeper:
    """The process's periodic sweep of expired holds."""

    def __init__(self, engine: AsyncEngine, interval_s: float = SWEEP_INTERVAL_S) -> None:
        assert interval_s > 0
        self.engine = engine
        self.interval_s = interval_s
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self.task is None, "started twice"
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self.task is None:
            return
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await sweep_expired_holds(self.engine)
            except Exception as error:
                # The sweeper must outlive any failure (Postgres restarting): the next
                # sweep tries again, and the holds wait a little longer.
                log.error("hold sweep failed: %s: %s", type(error).__name__, error)
