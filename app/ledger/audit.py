"""The second path to the ledger's invariants: running totals against the rows they sum.

The hot path keeps ``accounts.usage_micros`` and ``accounts.held_micros`` in step
with ``usage_records`` and ``holds`` inside each writing statement. This recomputes
both from the rows, so a test (or an operator) can see that no statement ever
moved one without the other. An account listed here is a bug, never an operating
error.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage import driver
from app.storage.tables import accounts, holds, usage_records

DISCREPANCIES = f"""
SELECT account.id, account.usage_micros, coalesce(used.total, 0)::bigint AS recorded_micros,
       account.held_micros, coalesce(held.total, 0)::bigint AS holds_micros
FROM {accounts.name} AS account
LEFT JOIN (SELECT account_id, sum(total_micros) AS total FROM {usage_records.name}
           GROUP BY account_id) AS used ON used.account_id = account.id
LEFT JOIN (SELECT account_id, sum(amount_micros) AS total FROM {holds.name}
           GROUP BY account_id) AS held ON held.account_id = account.id
WHERE ($1::bigint[] IS NULL OR account.id = ANY($1::bigint[]))
  AND (account.usage_micros <> coalesce(used.total, 0)
       OR account.held_micros <> coalesce(held.total, 0))
"""


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """An account whose running totals disagree with its rows."""

    account_id: int
    usage_micros: int
    recorded_micros: int
    held_micros: int
    holds_micros: int


async def ledger_discrepancies(
    engine: AsyncEngine, account_ids: list[int] | None = None
) -> list[Discrepancy]:
    """Accounts (all, or those listed) whose usage or held totals disagree with their rows."""
    rows = await driver.fetch(engine, DISCREPANCIES, account_ids)
    return [Discrepancy(row["id"], row["usage_micros"], row["recorded_micros"],
                        row["held_micros"], row["holds_micros"]) for row in rows]
