"""The ledger's own rules, checked from its rows (``app.storage.tables`` states them):

- per account: ``usage_micros`` = sum of its usage records, ``paid_micros`` = its confirmed
  payments + confirmed settlements, ``held_micros`` = its open holds (so its balance,
  ``usage - paid``, is what its rows say);
- no usage counted twice: one usage record per request id, and no request both charged
  (a usage record) and still reserved (an open hold);
- no hold open past its expiry plus a grace: the sweeper of any process releases an
  expired hold within seconds, so an overdue one means none is running;
- no reference names both a payment and a settlement.

The SQL is read by ``ledger_rows`` inside one snapshot; the functions here only turn its
rows into breaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.identity.tokens import account_reference
from app.reconcile.report import Breach, Check
from app.storage.tables import accounts, holds, payments, settlements, usage_records

# Past this, an expired hold means no sweeper ran (they sweep every few seconds).
HOLD_OVERDUE_GRACE_S = 300
# Rows per check: a ledger this broken needs a person, not a longer list.
BREACHES_PER_CHECK_MAX = 1_000

ACCOUNT_TOTALS = f"""
SELECT account.id, account.usage_micros, coalesce(used.total, 0)::bigint AS usage_rows,
       account.paid_micros,
       (coalesce(paid.total, 0) + coalesce(settled.total, 0))::bigint AS paid_rows,
       account.held_micros, coalesce(held.total, 0)::bigint AS held_rows
FROM {accounts.name} AS account
LEFT JOIN (SELECT account_id, sum(total_micros) AS total FROM {usage_records.name}
           GROUP BY account_id) AS used ON used.account_id = account.id
LEFT JOIN (SELECT account_id, sum(amount_micros) AS total FROM {payments.name}
           WHERE status = 'confirmed' GROUP BY account_id) AS paid
       ON paid.account_id = account.id
LEFT JOIN (SELECT account_id, sum(amount_micros) AS total FROM {settlements.name}
           WHERE status = 'confirmed' GROUP BY account_id) AS settled
       ON settled.account_id = account.id
LEFT JOIN (SELECT account_id, sum(amount_micros) AS total FROM {holds.name}
           GROUP BY account_id) AS held ON held.account_id = account.id
WHERE account.usage_micros <> coalesce(used.total, 0)
   OR account.paid_micros <> coalesce(paid.total, 0) + coalesce(settled.total, 0)
   OR account.held_micros <> coalesce(held.total, 0)
ORDER BY account.id
LIMIT :limit
"""

USAGE_COUNTED_TWICE = f"""
SELECT request_id, array_agg(account_id ORDER BY account_id) AS account_ids,
       sum(total_micros)::bigint AS total_micros
FROM {usage_records.name} GROUP BY request_id HAVING count(*) > 1
ORDER BY request_id LIMIT :limit
"""

HOLD_NOT_RELEASED = f"""
SELECT hold.request_id, hold.account_id, hold.amount_micros,
       record.account_id AS record_account_id
FROM {holds.name} AS hold
JOIN {usage_records.name} AS record ON record.request_id = hold.request_id
ORDER BY hold.request_id LIMIT :limit
"""

HOLD_OVERDUE = f"""
SELECT request_id, account_id, amount_micros,
       floor(extract(epoch FROM now() - expires_at))::bigint AS overdue_s
FROM {holds.name}
WHERE expires_at < now() - make_interval(secs => :grace_s)
ORDER BY expires_at LIMIT :limit
"""

REFERENCE_REUSED = f"""
SELECT reference FROM {payments.name}
INTERSECT
SELECT reference FROM {settlements.name}
ORDER BY reference LIMIT :limit
"""


def account_breaches(rows: Sequence[Any]) -> list[Breach]:
    """Rows of ``ACCOUNT_TOTALS``: up to three breaches per account."""
    breaches = []
    totals = (
        (Check.USAGE_TOTAL, "usage_micros", "usage_rows", "usage records"),
        (Check.PAID_TOTAL, "paid_micros", "paid_rows", "confirmed payments and settlements"),
        (Check.HELD_TOTAL, "held_micros", "held_rows", "open holds"),
    )
    for row in rows:
        for check, recorded, expected, rows_name in totals:
            if row[recorded] != row[expected]:
                breaches.append(Breach(
                    check, account_reference(row["id"]),
                    f"{recorded} is {row[recorded]}, its {rows_name} add up to {row[expected]}",
                    account_id=row["id"], recorded_micros=row[recorded],
                    expected_micros=row[expected],
                ))
    return breaches


def usage_counted_twice(rows: Sequence[Any]) -> list[Breach]:
    return [Breach(
        Check.USAGE_COUNTED_TWICE, row["request_id"],
        f"{len(row['account_ids'])} usage records for one request, on accounts "
        + ", ".join(account_reference(account_id) for account_id in row["account_ids"]),
        recorded_micros=row["total_micros"],
    ) for row in rows]


def holds_not_released(rows: Sequence[Any]) -> list[Breach]:
    return [Breach(
        Check.HOLD_NOT_RELEASED, row["request_id"],
        f"still held on {account_reference(row['account_id'])} although its usage record"
        f" (on {account_reference(row['record_account_id'])}) charged it",
        account_id=row["account_id"], recorded_micros=row["amount_micros"],
    ) for row in rows]


def holds_overdue(rows: Sequence[Any]) -> list[Breach]:
    return [Breach(
        Check.HOLD_OVERDUE, row["request_id"],
        f"open {row['overdue_s']} s past its expiry: is any hold sweeper running?",
        account_id=row["account_id"], recorded_micros=row["amount_micros"],
    ) for row in rows]


def references_reused(rows: Sequence[Any]) -> list[Breach]:
    return [Breach(Check.REFERENCE_REUSED, row["reference"],
                   "both a payment and a settlement have this reference") for row in rows]
