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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

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
_ARRAYS = ", ".join(
    f"${position}::{kind}[]" for position, (_, kind) in enumerate(RECORD_COLUMNS, start=1)
)
_RELEASES = f"${len(RECORD_COLUMNS) + 1}::text[]"
# One statement, built once, one round trip: insert the batch (one array per column),
# skip request ids already recorded, delete the holds of the batch's request ids (the
# recorded ones and those released without a record), and move exactly the inserted
# totals and the deleted holds on the accounts. A statement is atomic, so records,
# holds and totals move together. An account is updated once per statement, so its
# changes are summed first. It runs on the recorder's own connection.
WRITE_BATCH = f"""
WITH inserted AS (
    INSERT INTO {usage_records.name} ({_NAMES})
    SELECT * FROM unnest({_ARRAYS})
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, account_id, total_micros
), released AS (
    DELETE FROM {holds.name}
    WHERE request_id = ANY({_RELEASES})
    RETURNING request_id, account_id, amount_micros
), changes AS (
    SELECT account_id, sum(used)::bigint AS used, sum(freed)::bigint AS freed FROM (
        SELECT account_id, total_micros AS used, 0 AS freed FROM inserted
        UNION ALL
        SELECT account_id, 0, amount_micros FROM released
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
SELECT request_id, NULL::bigint AS released_micros FROM inserted
UNION ALL
SELECT request_id, amount_micros FROM released
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

    def __post_init__(self) -> None:
        assert self.total_micros == self.base_cost_micros + self.commission_micros
        assert min(self.base_cost_micros, self.commission_micros) >= 0

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class HoldRelease:
    """A call that produced nothing: its hold is released and nothing is recorded."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Written:
    """What one write did once committed."""

    # The usage record was inserted by this write (False: already there, or a release).
    recorded: bool
    # The amount of the hold this write deleted; None when the request had no open
    # hold (none was taken, it expired, or an earlier write released it).
    released_micros: int | None


Write: TypeAlias = UsageEntry | HoldRelease


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
        """Write one record, release its request's hold, and wait for the commit.

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

    async def _write_batch(self, batch: Sequence[Write]) -> list[Written]:
        """One transaction: insert new records, delete holds, move the accounts' totals."""
        entries = _unique(write for write in batch if isinstance(write, UsageEntry))
        releases = sorted({write.request_id for write in batch})
        # Postgres does not promise the UPDATE locks accounts in input order, so two
        # processes writing the same accounts can deadlock; Postgres then aborts one
        # transaction, which is retried with nothing written.
        rows = sorted(entries, key=lambda entry: entry.account_id)
        arrays = [[getattr(entry, name) for entry in rows] for name, _ in RECORD_COLUMNS]
        result = await self.connection.fetch(WRITE_BATCH, *arrays, releases)
        inserted = {row["request_id"] for row in result if row["released_micros"] is None}
        released = {row["request_id"]: int(row["released_micros"]) for row in result
                    if row["released_micros"] is not None}
        self.records_written += len(inserted)
        written = []
        for write in batch:
            recorded = isinstance(write, UsageEntry) and write.request_id in inserted
            written.append(Written(recorded, released.pop(write.request_id, None)))
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
