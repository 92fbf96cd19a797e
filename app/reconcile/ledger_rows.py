"""The ledger side, read in one snapshot: payments and settlements, and every invariant.

One ``REPEATABLE READ`` read-only transaction, because the ledger keeps running totals
in step with rows within each writing transaction: reading the totals and the rows at
two moments would report a payment confirmed in between as a broken invariant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.reconcile import invariants
from app.reconcile.errors import TooMuchToReconcile
from app.reconcile.records import LedgerEntry, LedgerKind
from app.reconcile.report import Breach
from app.storage.tables import payments, settlements

# Rows held in memory for one run: far beyond a day's settlements, and a bound all the same.
ENTRIES_MAX = 1_000_000


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    entries: tuple[LedgerEntry, ...]
    breaches: tuple[Breach, ...]
    notes: tuple[str, ...]


async def read_ledger(engine: AsyncEngine, *, with_entries: bool,
                      hold_grace_s: int = invariants.HOLD_OVERDUE_GRACE_S) -> LedgerSnapshot:
    """The invariant breaches, and the payment and settlement rows if `with_entries`."""
    assert hold_grace_s >= 0
    async with engine.connect() as connection:
        snapshot = await connection.execution_options(isolation_level="REPEATABLE READ")
        async with snapshot.begin():
            await snapshot.execute(sa.text("SET TRANSACTION READ ONLY"))
            breaches, notes = await _breaches(snapshot, hold_grace_s)
            entries = await _entries(snapshot) if with_entries else []
    return LedgerSnapshot(tuple(entries), tuple(breaches), tuple(notes))


async def _breaches(connection: AsyncConnection, hold_grace_s: int
                    ) -> tuple[list[Breach], list[str]]:
    limit = invariants.BREACHES_PER_CHECK_MAX
    checks: tuple[tuple[str, dict[str, int], Callable[[Sequence[Any]], list[Breach]]], ...] = (
        (invariants.ACCOUNT_TOTALS, {}, invariants.account_breaches),
        (invariants.USAGE_COUNTED_TWICE, {}, invariants.usage_counted_twice),
        (invariants.HOLD_NOT_RELEASED, {}, invariants.holds_not_released),
        (invariants.HOLD_OVERDUE, {"grace_s": hold_grace_s}, invariants.holds_overdue),
        (invariants.REFERENCE_REUSED, {}, invariants.references_reused),
    )
    breaches: list[Breach] = []
    notes: list[str] = []
    for statement, parameters, to_breaches in checks:
        rows = (await connection.execute(
            sa.text(statement), {**parameters, "limit": limit})).mappings().all()
        found = to_breaches(rows)
        if len(rows) == limit:
            notes.append(f"only the first {limit} rows of the {found[0].check} check are shown")
        breaches.extend(found)
    return breaches, notes


async def _entries(connection: AsyncConnection) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    p, s = payments.c, settlements.c
    queries: tuple[tuple[LedgerKind, sa.Select[Any]], ...] = (
        ("payment", sa.select(p.reference, p.account_id, p.chain_id, p.amount_micros,
                              p.status, p.tx_hash, p.payer.label("payer")).order_by(p.id)),
        ("settlement", sa.select(s.reference, s.account_id, s.chain_id, s.amount_micros,
                                 s.status, s.tx_hash, s.smart_account.label("payer"))
         .order_by(s.id)),
    )
    for kind, query in queries:
        result = await connection.stream(query.limit(ENTRIES_MAX + 1 - len(entries)))
        async for row in result:
            entries.append(LedgerEntry(
                kind=kind,
                reference=row.reference.lower(), account_id=row.account_id,
                chain_id=row.chain_id, amount_micros=row.amount_micros, status=row.status,
                tx_hash=row.tx_hash.lower() if row.tx_hash else None,
                payer=row.payer.lower(),
            ))
        if len(entries) > ENTRIES_MAX:
            raise TooMuchToReconcile(
                f"more than {ENTRIES_MAX} payment and settlement rows: more than one run holds")
    return entries
