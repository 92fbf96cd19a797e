"""Accounts as the operator sees them: every account's money, and the one setting the
operator changes (the credit limit). Amounts are integer micro-USD, named ``*_micros``
as in the ledger, so what the API shows and what PATCH takes read the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from app.identity.tokens import ACCOUNT_ID_PREFIX, account_reference
from app.ledger.balance import AccountBalance
from app.ledger.money import COST_UNIT
from app.storage.tables import accounts, payments, settlements

# A credit limit above a million dollars is a typo, not a decision.
CREDIT_LIMIT_MICROS_MAX = 10**12
# Largest account id an ``acct_`` reference may name (BIGINT).
ACCOUNT_ID_MAX = 2**63 - 1
PAYMENT_ID_PREFIX = "pay_"
SETTLEMENT_ID_PREFIX = "stl_"


def parse_account_reference(raw: str) -> int | None:
    """``acct_<id>`` to its id, or None if it cannot name an account."""
    digits = raw.removeprefix(ACCOUNT_ID_PREFIX)
    if digits == raw or not digits.isdigit() or len(digits) > 19:
        return None
    account_id = int(digits)
    return account_id if 0 < account_id <= ACCOUNT_ID_MAX else None


def _unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def account_object(row: RowMapping) -> dict[str, Any]:
    balance = AccountBalance(
        usage_micros=row["usage_micros"], paid_micros=row["paid_micros"],
        held_micros=row["held_micros"], credit_limit_micros=row["credit_limit_micros"],
        settlement_failed=row["settlement_failed_at"] is not None,
    )
    return {
        "object": "account",
        "id": account_reference(row["id"]),
        "chain_id": row["chain_id"],
        "wallet": row["wallet"],
        "smart_account": row["smart_account"],
        "status": row["status"],
        "cost_unit": COST_UNIT,
        "usage_micros": balance.usage_micros,
        "paid_micros": balance.paid_micros,
        "balance_micros": balance.balance_micros,
        "held_micros": balance.held_micros,
        # The limit the operator set; while a settlement has failed, 0 applies instead.
        "credit_limit_micros": balance.credit_limit_micros,
        "effective_credit_limit_micros": balance.effective_credit_limit_micros,
        "available_micros": balance.available_micros,
        "settlement_failed_at": _unix(row["settlement_failed_at"]),
        "created": _unix(row["created_at"]),
    }


def payment_object(row: RowMapping) -> dict[str, Any]:
    return {
        "object": "payment", "id": f"{PAYMENT_ID_PREFIX}{row['id']}",
        "reference": row["reference"], "status": row["status"], "method": row["method"],
        "amount_micros": row["amount_micros"], "payer": row["payer"], "asset": row["asset"],
        "chain_id": row["chain_id"], "tx_hash": row["tx_hash"],
        "failure_reason": row["failure_reason"], "created": _unix(row["created_at"]),
        "confirmed": _unix(row["confirmed_at"]),
    }


def settlement_object(row: RowMapping) -> dict[str, Any]:
    return {
        "object": "settlement", "id": f"{SETTLEMENT_ID_PREFIX}{row['id']}",
        "reference": row["reference"], "status": row["status"],
        "amount_micros": row["amount_micros"], "cumulative_micros": row["cumulative_micros"],
        "smart_account": row["smart_account"], "session_key": row["session_key"],
        "chain_id": row["chain_id"], "tx_hash": row["tx_hash"],
        "failure_reason": row["failure_reason"], "created": _unix(row["created_at"]),
        "confirmed": _unix(row["confirmed_at"]),
    }


async def account_page(engine: AsyncEngine, *, limit: int, starting_after: int | None
                       ) -> tuple[Sequence[RowMapping], bool]:
    """Up to `limit` accounts, newest first, after the cursor; and whether more follow."""
    assert limit > 0
    query = sa.select(accounts).order_by(accounts.c.id.desc()).limit(limit + 1)
    if starting_after is not None:
        query = query.where(accounts.c.id < starting_after)
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).mappings().all()
    return rows[:limit], len(rows) > limit


async def find_account(engine: AsyncEngine, account_id: int) -> RowMapping | None:
    async with engine.connect() as connection:
        return (await connection.execute(
            sa.select(accounts).where(accounts.c.id == account_id))).mappings().first()


async def recent_money(engine: AsyncEngine, account_id: int, *, limit: int
                       ) -> dict[str, tuple[Sequence[RowMapping], bool]]:
    """The account's newest payments and settlements (up to `limit` of each), and whether
    it has older ones."""
    found = {}
    async with engine.connect() as connection:
        for name, table in (("payments", payments), ("settlements", settlements)):
            rows = (await connection.execute(
                sa.select(table).where(table.c.account_id == account_id)
                .order_by(table.c.id.desc()).limit(limit + 1))).mappings().all()
            found[name] = (rows[:limit], len(rows) > limit)
    return found


async def set_credit_limit(engine: AsyncEngine, account_id: int, credit_limit_micros: int
                           ) -> tuple[RowMapping, int] | None:
    """Set the account's credit limit; the updated row and the previous limit, or None if
    there is no such account. Admission reads the row itself, so the limit applies to the
    very next request."""
    assert 0 <= credit_limit_micros <= CREDIT_LIMIT_MICROS_MAX
    async with engine.begin() as connection:
        previous = (await connection.execute(
            sa.select(accounts.c.credit_limit_micros).where(accounts.c.id == account_id)
            .with_for_update())).scalar_one_or_none()
        if previous is None:
            return None
        row = (await connection.execute(
            sa.update(accounts).where(accounts.c.id == account_id)
            .values(credit_limit_micros=credit_limit_micros).returning(*accounts.c)
        )).mappings().one()
    return row, int(previous)
