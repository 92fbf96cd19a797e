"""The payments table: a payment is written ``pending`` before anything is sent, and
resolved once: ``confirmed`` (its amount credited to the account in the same statement)
or ``failed`` with its reason. Both resolutions are conditional on ``pending``, so a
second attempt to resolve changes nothing: a payment is never credited twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage import driver
from app.storage.tables import accounts, payments

CONFIRM = f"""
WITH confirmed AS (
    UPDATE {payments.name}
    SET status = 'confirmed', confirmed_at = now(), tx_hash = coalesce($2, tx_hash)
    WHERE reference = $1 AND status = 'pending'
    RETURNING account_id, amount_micros
)
UPDATE {accounts.name} AS account
SET paid_micros = account.paid_micros + confirmed.amount_micros,
    -- Paying is how an account whose settlement failed gets its credit back.
    settlement_failed_at = NULL
FROM confirmed WHERE account.id = confirmed.account_id
RETURNING account.id
"""

FAIL = f"""
UPDATE {payments.name} SET status = 'failed', failure_reason = $2
WHERE reference = $1 AND status = 'pending' RETURNING id
"""

SET_TX = f"UPDATE {payments.name} SET tx_hash = $2 WHERE reference = $1 AND status = 'pending'"


@dataclass(frozen=True, slots=True)
class PaymentRow:
    reference: str
    account_id: int
    amount_micros: int
    status: str
    tx_hash: str | None
    failure_reason: str | None


@dataclass(frozen=True, slots=True)
class NewPayment:
    reference: str
    account_id: int
    chain_id: int
    asset: str
    payer: str
    nonce: str
    amount_micros: int
    method: str
    valid_before_s: int


async def record_pending(engine: AsyncEngine, payment: NewPayment) -> bool:
    """Write the pending row. False: this authorization (or reference) is already recorded."""
    statement = insert(payments).values(
        reference=payment.reference, account_id=payment.account_id, chain_id=payment.chain_id,
        asset=payment.asset.lower(), payer=payment.payer.lower(), nonce=payment.nonce,
        amount_micros=payment.amount_micros, method=payment.method, status="pending",
        valid_before=datetime.fromtimestamp(payment.valid_before_s, UTC),
    ).on_conflict_do_nothing().returning(payments.c.id)
    async with engine.begin() as connection:
        return (await connection.execute(statement)).first() is not None


async def find(engine: AsyncEngine, reference: str) -> PaymentRow | None:
    async with engine.connect() as connection:
        row = (await connection.execute(
            select(payments.c.reference, payments.c.account_id, payments.c.amount_micros,
                   payments.c.status, payments.c.tx_hash, payments.c.failure_reason)
            .where(payments.c.reference == reference)
        )).first()
    if row is None:
        return None
    return PaymentRow(str(row.reference), int(row.account_id), int(row.amount_micros),
                      str(row.status), row.tx_hash, row.failure_reason)


async def set_tx_hash(engine: AsyncEngine, reference: str, tx_hash: str) -> None:
    await driver.fetch(engine, SET_TX, reference, tx_hash)


async def confirm(engine: AsyncEngine, reference: str, tx_hash: str | None) -> bool:
    """Confirm and credit once. False: it was not pending (already resolved)."""
    return bool(await driver.fetch(engine, CONFIRM, reference, tx_hash))


async def fail(engine: AsyncEngine, reference: str, reason: str) -> bool:
    return bool(await driver.fetch(engine, FAIL, reference, reason[:500]))


async def payer_account(engine: AsyncEngine, chain_id: int, payer: str) -> int:
    """The payer's own account (created on first payment, credit limit 0: x402 payers
    prepay). A wallet that already has an account keeps it and its credit limit."""
    payer = payer.lower()
    async with engine.begin() as connection:
        await connection.execute(
            insert(accounts).values(chain_id=chain_id, smart_account=payer, wallet=payer,
                                    credit_limit_micros=0)
            .on_conflict_do_nothing(index_elements=["chain_id", "smart_account"])
        )
        account_id = (await connection.execute(
            select(accounts.c.id).where(accounts.c.chain_id == chain_id,
                                        accounts.c.smart_account == payer)
        )).scalar_one()
    return int(account_id)
