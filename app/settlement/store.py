"""The settlement rows: which accounts are due, and the statements that move a collection.

A collection is a ``settlements`` row, TigerBeetle's pending transfer: written ``pending``
(and committed) before anything is sent, then resolved exactly once, ``confirmed`` (its
amount added to ``accounts.paid_micros`` in the same statement) or ``failed`` (the
account's ``settlement_failed_at`` set in the same statement). Both resolutions are
conditional on ``status = 'pending'``, so resolving twice changes nothing.

Who may work on a row is decided by Postgres, never by a worker's memory: the partial
unique index allows one pending row per account (a second opener's insert does nothing),
and a worker holds a row lock (``FOR UPDATE SKIP LOCKED``) for each step it takes, so two
workers never send for the same row at once; the other one skips it.

Debt is ``usage - paid - pending settlements - pending x402 payments``: what is already on
its way is not asked for twice. Accounts with a pending settlement are not candidates at
all (they cannot have a second one).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.storage.tables import accounts, payments, settlements, usage_records, vouchers

PENDING = "pending"
CONFIRMED = "confirmed"
FAILED = "failed"

_PENDING_PAYMENTS = f"""coalesce((SELECT sum(p.amount_micros) FROM {payments.name} AS p
             WHERE p.account_id = a.id AND p.status = 'pending'), 0)"""

# Accounts owing at least `threshold`, or at least `minimum` since before `age`, that have a
# voucher still usable on chain and no collection in flight. An account whose last
# collection failed is retried only once its agent posted a voucher after the failure.
# "Owing since" is the time of the oldest usage record the payments do not cover yet
# (payments cover the oldest usage first): walking back from the newest record until the
# records add up to the debt.
_DUE = text(f"""
SELECT a.id AS account_id, a.smart_account, debt.micros AS debt_micros,
       uncovered.since AS uncovered_since
FROM {accounts.name} AS a
CROSS JOIN LATERAL (
    SELECT (a.usage_micros - a.paid_micros - {_PENDING_PAYMENTS})::bigint AS micros
) AS debt
LEFT JOIN LATERAL (
    SELECT newest_first.created_at AS since
    FROM (SELECT r.created_at,
                 sum(r.total_micros) OVER (ORDER BY r.created_at DESC, r.id DESC)
                     AS newer_micros
          FROM {usage_records.name} AS r WHERE r.account_id = a.id
          ORDER BY r.created_at DESC, r.id DESC) AS newest_first
    WHERE newest_first.newer_micros >= debt.micros
    LIMIT 1
) AS uncovered ON debt.micros < :threshold
WHERE a.chain_id = :chain_id
  AND debt.micros >= :minimum
  AND (debt.micros >= :threshold OR uncovered.since <= now() - make_interval(secs => :age_s))
  AND NOT EXISTS (SELECT 1 FROM {settlements.name} AS s
                  WHERE s.account_id = a.id AND s.status = 'pending')
  AND EXISTS (SELECT 1 FROM {vouchers.name} AS v
              WHERE v.account_id = a.id AND v.settlement = :settlement
                AND v.deadline > :usable_after
                AND (a.settlement_failed_at IS NULL OR v.updated_at > a.settlement_failed_at))
ORDER BY debt.micros DESC, a.id
LIMIT :limit
""")

_FAILED_ATTEMPTS = text(f"""
SELECT count(*) FROM {settlements.name}
WHERE account_id = :account_id AND session_key = :session_key
  AND cumulative_micros = :cumulative AND status = 'failed'
""")

# The row is written only while the account still owes the amount, and not at all when the
# account already has a pending collection or the reference exists (ON CONFLICT covers the
# partial unique index and the unique reference alike).
_OPEN = text(f"""
INSERT INTO {settlements.name}
    (reference, account_id, chain_id, amount_micros, status, smart_account, session_key,
     cumulative_micros)
SELECT :reference, a.id, a.chain_id, CAST(:amount AS bigint), 'pending', a.smart_account,
       :session_key, CAST(:cumulative AS bigint)
FROM {accounts.name} AS a
WHERE a.id = :account_id
  AND a.usage_micros - a.paid_micros - {_PENDING_PAYMENTS} >= CAST(:amount AS bigint)
ON CONFLICT DO NOTHING
RETURNING id
""")

# Pending rows this deployment can finish: their key has a voucher for this contract.
_PENDING_IDS = text(f"""
SELECT s.id FROM {settlements.name} AS s
WHERE s.status = 'pending' AND s.chain_id = :chain_id
  AND EXISTS (SELECT 1 FROM {vouchers.name} AS v
              WHERE v.account_id = s.account_id AND v.session_key = s.session_key
                AND v.settlement = :settlement)
ORDER BY s.id
LIMIT :limit
""")

_CLAIM = text(f"""
SELECT id, reference, account_id, chain_id, amount_micros, tx_hash, smart_account,
       session_key, cumulative_micros
FROM {settlements.name}
WHERE id = :id AND status = 'pending'
FOR UPDATE SKIP LOCKED
""")

_STATUS = text(f"SELECT status FROM {settlements.name} WHERE id = :id")

_RECORD_SENT = text(f"""
UPDATE {settlements.name} SET tx_hash = :tx_hash WHERE id = :id AND status = 'pending'
""")

# One statement: the row is confirmed and its amount paid, or (already resolved) nothing
# happens. A confirmed collection also clears a failed-settlement flag: the account paid.
_CONFIRM = text(f"""
WITH confirmed AS (
    UPDATE {settlements.name}
    SET status = 'confirmed', tx_hash = :tx_hash, confirmed_at = now()
    WHERE id = :id AND status = 'pending' AND amount_micros = :amount
    RETURNING account_id, amount_micros
)
UPDATE {accounts.name} AS a
SET paid_micros = a.paid_micros + confirmed.amount_micros, settlement_failed_at = NULL
FROM confirmed WHERE a.id = confirmed.account_id
RETURNING a.id
""")

_FAIL = text(f"""
WITH failed AS (
    UPDATE {settlements.name}
    SET status = 'failed', failure_reason = :reason
    WHERE id = :id AND status = 'pending'
    RETURNING account_id
)
UPDATE {accounts.name} AS a SET settlement_failed_at = now()
FROM failed WHERE a.id = failed.account_id
RETURNING a.id
""")

# Bounds a stored failure reason (they come from revert names and node messages).
FAILURE_REASON_CHARS_MAX = 500


@dataclass(frozen=True, slots=True)
class DueAccount:
    """An account the worker should collect from now."""

    account_id: int
    smart_account: str
    debt_micros: int
    uncovered_since: dt.datetime | None

    def __post_init__(self) -> None:
        assert self.debt_micros > 0


@dataclass(frozen=True, slots=True)
class PendingSettlement:
    """A collection in flight, as claimed under its row lock."""

    id: int
    reference: str
    account_id: int
    chain_id: int
    amount_micros: int
    tx_hash: str | None
    smart_account: str
    session_key: str
    cumulative_micros: int

    def __post_init__(self) -> None:
        assert self.amount_micros > 0 and self.cumulative_micros >= self.amount_micros


class SettlementStore:
    """The settlement statements of one settlement contract on one chain."""

    def __init__(self, engine: AsyncEngine, *, chain_id: int, settlement: str) -> None:
        self.engine = engine
        self.chain_id = chain_id
        self.settlement = settlement.lower()

    async def due_accounts(self, *, threshold_micros: int, minimum_micros: int, age_s: int,
                           usable_after_s: int, limit: int) -> list[DueAccount]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(_DUE, {
                "chain_id": self.chain_id, "settlement": self.settlement,
                "threshold": threshold_micros, "minimum": minimum_micros, "age_s": age_s,
                "usable_after": dt.datetime.fromtimestamp(usable_after_s, dt.UTC),
                "limit": limit,
            })
            return [DueAccount(row.account_id, row.smart_account, row.debt_micros,
                               row.uncovered_since) for row in rows]

    async def failed_attempts(self, account_id: int, session_key: str, cumulative_micros: int
                              ) -> int:
        async with self.engine.connect() as connection:
            return int((await connection.execute(_FAILED_ATTEMPTS, {
                "account_id": account_id, "session_key": session_key.lower(),
                "cumulative": cumulative_micros})).scalar_one())

    async def open(self, *, reference: str, account_id: int, amount_micros: int,
                   session_key: str, cumulative_micros: int) -> int | None:
        """Write a pending collection and commit it; None if the account has one already,
        the reference exists, or the account no longer owes ``amount_micros``."""
        assert amount_micros > 0
        async with self.engine.begin() as connection:
            return (await connection.execute(_OPEN, {
                "reference": reference, "account_id": account_id, "amount": amount_micros,
                "session_key": session_key.lower(), "cumulative": cumulative_micros,
            })).scalar_one_or_none()

    async def pending_ids(self, limit: int) -> list[int]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(_PENDING_IDS, {
                "chain_id": self.chain_id, "settlement": self.settlement, "limit": limit})
            return [int(row.id) for row in rows]

    async def status(self, settlement_id: int) -> str:
        async with self.engine.connect() as connection:
            return str((await connection.execute(_STATUS, {"id": settlement_id})).scalar_one())

    async def claim(self, connection: AsyncConnection, settlement_id: int
                    ) -> PendingSettlement | None:
        """Lock the row for this transaction if it is pending and nobody else holds it."""
        row = (await connection.execute(_CLAIM, {"id": settlement_id})).first()
        if row is None:
            return None
        return PendingSettlement(
            id=row.id, reference=row.reference, account_id=row.account_id,
            chain_id=row.chain_id, amount_micros=row.amount_micros, tx_hash=row.tx_hash,
            smart_account=row.smart_account, session_key=row.session_key,
            cumulative_micros=row.cumulative_micros)

    async def record_sent(self, connection: AsyncConnection, settlement_id: int,
                          tx_hash: str) -> None:
        result = await connection.execute(_RECORD_SENT, {"id": settlement_id,
                                                         "tx_hash": tx_hash})
        assert result.rowcount == 1, "the row is pending and locked by this transaction"

    async def confirm(self, connection: AsyncConnection, settlement: PendingSettlement,
                      tx_hash: str) -> None:
        """Confirm the locked row and add its amount to the account's payments."""
        paid = (await connection.execute(_CONFIRM, {
            "id": settlement.id, "tx_hash": tx_hash, "amount": settlement.amount_micros,
        })).all()
        assert len(paid) == 1, "a locked pending row is confirmed exactly once"

    async def fail(self, connection: AsyncConnection, settlement: PendingSettlement,
                   reason: str) -> None:
        """Mark the locked row failed and cut the account's credit to prepaid only."""
        failed = (await connection.execute(_FAIL, {
            "id": settlement.id, "reason": reason[:FAILURE_REASON_CHARS_MAX]})).all()
        assert len(failed) == 1, "a locked pending row fails exactly once"
