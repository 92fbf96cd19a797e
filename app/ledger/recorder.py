"""Writing usage records and resolving holds, with group commit.

Every call that was admitted resolves its hold here: a completed call writes one
usage record, deletes its hold and moves the amounts on its account (usage up by
the record's total, held down by the hold's amount) in one transaction; a call
that produced nothing only releases its hold. That write is on every request, so
concurrent requests share transactions (``app.ledger.group_commit``): one
statement per batch (a multi-row INSERT, a DELETE of the holds, one UPDATE of
the accounts), committed durably before any request of the batch is answered.

The request id is unique in ``usage_records``; a record whose id is already
there is skipped and adds nothing to the usage, so a retried write never
charges twice. A hold is subtracted only by the statement that deletes it, so
a hold released twice (a retry, the expiry sweep) is subtracted once.

A call admitted on a credit lease (``app.ledger.leases``) has no hold of its own:
its record draws its total from the lease's hold, in the same statement, so the
account's ``held_micros`` goes down by exactly what its ``usage_micros`` goes up.
A draw never takes a lease below zero (an overrun takes what is left and says the
lease fell short), and only an inserted record draws, so a retried write draws once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import ServiceUnavailable
from app.ledger.connection import WriterConnection
from app.ledger.group_commit import GroupCommitter
from app.storage.tables import accounts, holds, usage_records

log = logging.getLogger(__name__)

# Writes per transaction: large enough to absorb bursts, small enough to keep one
# transaction (and the account rows it locks) short.
MAX_BATCH_RECORDS = 500
# A write that fails (Postgres restarting, a network blip) is retried this often.
WRITE_ATTEMPTS = 3
WRITE_RETRY_DELAY_S = 0.2
# Requests waiting for a commit: beyond this, new requests wait for room (backpressure).
MAX_QUEUED_RECORDS = 10_000


# The columns of a record and their Postgres array types, in one place.
RECORD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("request_id", "text"), ("account_id", "bigint"), ("session_jti", "text"),
    ("public_model", "text"), ("provider", "text"), ("upstream_model", "text"),
    ("prompt_tokens", "integer"), ("completion_tokens", "integer"),
    ("cached_tokens", "integer"), ("reasoning_tokens", "integer"),
    ("base_cost_micros", "bigint"), ("commission_rate_bps", "integer"),
    ("commission_micros", "bigint"), ("total_micros", "bigint"), ("status", "text"),
    ("streamed", "boolean"), ("usage_source", "text"), ("latency_ms", "integer"),
    ("time_to_first_chunk_ms", "integer"),
)
_NAMES = ", ".join(name for name, _ in RECORD_COLUMNS)
# The batch's records arrive as one JSON array of objects (orjson writes the entries
# as they are): ~1 µs per record to encode, where one array parameter per column cost
# ~8 µs per record and ~75 µs per statement in asyncpg's encoders. Integers stay
# exact: Postgres reads each JSON number into the column's integer type.
_RECORDSET = ", ".join(f"{name} {kind}" for name, kind in RECORD_COLUMNS) + ", lease_id text"
# One statement, built once, one round trip: insert the batch (one JSON document),
# skip request ids already recorded, draw the inserted totals (and the shrinks) from
# their leases' holds, delete the holds of the batch's request ids (the recorded ones
# and those released without a record), and move exactly the inserted totals, the
# drawn amounts and the deleted holds on the accounts. A statement is atomic, so
# records, holds and totals move together. An account is updated once per statement,
# so its changes are summed first. It runs on the recorder's own connection, which
# is the only writer of a lease's hold besides the expiry sweep (SKIP LOCKED).
WRITE_BATCH = f"""
WITH batch AS (
    SELECT * FROM json_to_recordset($1::json) AS record({_RECORDSET})
), inserted AS (
    INSERT INTO {usage_records.name} ({_NAMES})
    SELECT {_NAMES} FROM batch
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, account_id, total_micros
), draws AS (
    SELECT lease_id, sum(amount)::bigint AS amount FROM (
        SELECT batch.lease_id, inserted.total_micros AS amount
        FROM inserted JOIN batch USING (request_id)
        WHERE batch.lease_id IS NOT NULL
        UNION ALL
        SELECT lease_id, amount FROM unnest($3::text[], $4::bigint[]) AS shrink(lease_id, amount)
    ) AS draw
    GROUP BY lease_id
), leased AS (
    SELECT hold.request_id, least(hold.amount_micros, draws.amount) AS taken
    FROM {holds.name} AS hold JOIN draws ON hold.request_id = draws.lease_id
    FOR UPDATE OF hold
), drawn AS (
    UPDATE {holds.name} AS hold
    SET amount_micros = hold.amount_micros - leased.taken
    FROM leased
    WHERE hold.request_id = leased.request_id
    RETURNING hold.request_id, hold.account_id, leased.taken
), released AS (
    DELETE FROM {holds.name}
    WHERE request_id = ANY($2::text[])
    RETURNING request_id, account_id, amount_micros
), changes AS (
    SELECT account_id, sum(used)::bigint AS used, sum(freed)::bigint AS freed FROM (
        SELECT account_id, total_micros AS used, 0 AS freed FROM inserted
        UNION ALL
        SELECT account_id, 0, amount_micros FROM released
        UNION ALL
        SELECT account_id, 0, taken FROM drawn
    ) AS change
    GROUP BY account_id
), totals AS (
    UPDATE {accounts.name} AS account
    SET usage_micros = account.usage_micros + changes.used,
        held_micros = account.held_micros - changes.freed
    FROM changes
    WHERE account.id = changes.account_id
    RETURNING account.id
)
SELECT 'recorded' AS kind, request_id, NULL::bigint AS amount FROM inserted
UNION ALL
SELECT 'released', request_id, amount_micros FROM released
UNION ALL
SELECT 'drawn', request_id, taken FROM drawn
"""


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """One usage record to write; field names are the table's columns."""

    request_id: str
    account_id: int
    session_jti: str | None
    public_model: str
    provider: str
    upstream_model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    base_cost_micros: int
    commission_rate_bps: int
    commission_micros: int
    total_micros: int
    status: str
    streamed: bool
    usage_source: str
    latency_ms: int | None
    time_to_first_chunk_ms: int | None
    # The credit lease the call was admitted on (its hold's id), if any: the record
    # draws its total from it. Not a column.
    lease_id: str | None = None

    def __post_init__(self) -> None:
        assert self.total_micros == self.base_cost_micros + self.commission_micros
        assert min(self.base_cost_micros, self.commission_micros) >= 0

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name, _ in RECORD_COLUMNS}


@dataclass(frozen=True, slots=True)
class HoldRelease:
    """A call that produced nothing: its hold is released and nothing is recorded."""

    request_id: str


@dataclass(frozen=True, slots=True)
class LeaseShrink:
    """Credit a lease gives back while calls on it are still in flight (it shrinks its hold)."""

    lease_id: str
    amount_micros: int

    def __post_init__(self) -> None:
        assert self.amount_micros > 0


@dataclass(frozen=True, slots=True)
class Written:
    """What one write did once committed."""

    # The usage record was inserted by this write (False: already there, or a release).
    recorded: bool
    # The amount of the hold this write deleted; None when the request had no open
    # hold (none was taken, it expired, or an earlier write released it).
    released_micros: int | None
    # A draw on a lease (a leased record, a shrink) that did not take its whole amount:
    # the lease's hold was smaller than its owner counted (an overrun, an expiry), or
    # a leased record was already there. The owner stops using the lease.
    lease_short: bool = False


Write: TypeAlias = UsageEntry | HoldRelease | LeaseShrink


class UsageRecorder:
    """The process's single writer of usage records and hold resolutions."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.connection = WriterConnection(engine, name="recorder")
        self.writer: GroupCommitter[Write, Written] = GroupCommitter(
            "usage", self._write_batch, _unavailable, max_batch=MAX_BATCH_RECORDS,
            max_queued=MAX_QUEUED_RECORDS, attempts=WRITE_ATTEMPTS,
            retry_delay_s=WRITE_RETRY_DELAY_S,
        )
        self.records_written = 0

    @property
    def batches_written(self) -> int:
        return self.writer.batches_written

    def start(self) -> None:
        self.writer.start()

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        await self.writer.stop()
        await self.connection.close()

    async def record(self, entry: UsageEntry) -> Written:
        """Write one record, resolve its request's hold (or draw on its lease), wait for the commit.

        Raises ``ServiceUnavailable`` when the database could not take it.
        """
        return await self.writer.submit(entry)

    async def release(self, request_id: str) -> Written:
        """Release the hold of a request that produced nothing, and wait for the commit."""
        return await self.writer.submit(HoldRelease(request_id))

    def release_soon(self, request_id: str) -> None:
        """Queue a release nobody waits for (an admission interrupted by cancellation).

        When the queue is full the hold is left to expire.
        """
        if not self.writer.submit_nowait(HoldRelease(request_id)):
            log.warning("hold of request %s left to expire: the ledger queue is full",
                        request_id)

    async def shrink(self, lease_id: str, amount_micros: int) -> Written:
        """Give back part of a lease's hold, and wait for the commit."""
        return await self.writer.submit(LeaseShrink(lease_id, amount_micros))

    async def _write_batch(self, batch: Sequence[Write]) -> list[Written]:
        """One transaction: insert new records, draw on leases, delete holds, move the totals."""
        drawn_leases = {write.lease_id for write in batch
                        if isinstance(write, LeaseShrink | UsageEntry) and write.lease_id}
        releases = {write.request_id for write in batch if isinstance(write, HoldRelease)}
        if releases & drawn_leases:
            # A statement must not both update and delete one row: a lease released
            # right after its last draw is deleted by a second statement.
            later = [isinstance(write, HoldRelease) and write.request_id in drawn_leases
                     for write in batch]
            first = [write for write, wait in zip(batch, later, strict=True) if not wait]
            second = [write for write, wait in zip(batch, later, strict=True) if wait]
            done = dict(zip(map(id, first), await self._write_batch(first), strict=True))
            done.update(zip(map(id, second), await self._write_batch(second), strict=True))
            return [done[id(write)] for write in batch]
        # A record deletes its request's own hold too (a leased call has none).
        deletes = {write.request_id for write in batch if not isinstance(write, LeaseShrink)}
        entries = _unique(write for write in batch if isinstance(write, UsageEntry))
        # Postgres does not promise the UPDATE locks accounts in input order, so two
        # processes writing the same accounts can deadlock; Postgres then aborts one
        # transaction, which is retried with nothing written.
        rows = sorted(entries, key=lambda entry: entry.account_id)
        shrinks = [write for write in batch if isinstance(write, LeaseShrink)]
        result = await self.connection.fetch(
            WRITE_BATCH, orjson.dumps(rows).decode(), sorted(deletes),
            [shrink.lease_id for shrink in shrinks], [shrink.amount_micros for shrink in shrinks],
        )
        inserted = {row["request_id"] for row in result if row["kind"] == "recorded"}
        released = {row["request_id"]: int(row["amount"]) for row in result
                    if row["kind"] == "released"}
        taken = {row["request_id"]: int(row["amount"]) for row in result
                 if row["kind"] == "drawn"}
        asked: dict[str, int] = {}
        for entry in rows:
            if entry.lease_id and entry.request_id in inserted:
                asked[entry.lease_id] = asked.get(entry.lease_id, 0) + entry.total_micros
        for shrink in shrinks:
            asked[shrink.lease_id] = asked.get(shrink.lease_id, 0) + shrink.amount_micros
        short = {lease for lease, amount in asked.items() if taken.get(lease, 0) < amount}
        self.records_written += len(inserted)
        written = []
        for write in batch:
            if isinstance(write, LeaseShrink):
                written.append(Written(False, None, write.lease_id in short))
                continue
            recorded = isinstance(write, UsageEntry) and write.request_id in inserted
            lease = write.lease_id if isinstance(write, UsageEntry) else None
            lease_short = lease is not None and (not recorded or lease in short)
            written.append(Written(recorded, released.pop(write.request_id, None), lease_short))
            # Only the first of two queued duplicates counts as inserted.
            inserted.discard(write.request_id)
        return written


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "the usage ledger is unavailable; the request was not billed",
        code="ledger_unavailable",
    )


def _unique(entries: Any) -> list[UsageEntry]:
    """One row per request id (a duplicate in the same batch would fail the INSERT)."""
    seen: dict[str, UsageEntry] = {}
    for entry in entries:
        seen.setdefault(entry.request_id, entry)
    return list(seen.values())
