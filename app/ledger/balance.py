"""The one balance rule: what an account owes, what it has reserved, and what it may spend.

    balance   = usage - paid          (recorded usage minus confirmed payments;
                                       negative: prepaid credit)
    admitted  iff  balance + open holds + this request's max cost <= credit limit

The credit limit is the account's own (``accounts.credit_limit_micros``), except
that an account whose settlement failed (``settlement_failed_at`` set) is served
on prepaid credit only: its effective credit limit is 0 until the flag is
cleared. Payers with no session (x402 only) have a credit limit of 0 for the
same reason: they prepay, and what they prepay is credit for their wallet.

The rule is applied in exactly one place, atomically, by the statement that
takes a hold (``app.ledger.holds``, ``ADMITS`` below is its condition); this
module holds the same rule for reading (``/v1/account``, the numbers of a 402).
Every amount is integer micro-USD (``app.ledger.money``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import CreditLimitExceeded, NotFound
from app.storage import driver
from app.storage.tables import accounts

# The rule as SQL over an ``accounts`` row, for a cost given as ``{cost}``. Both the
# hold statement and ``AccountBalance.admits`` spell it out; a test checks they agree.
EFFECTIVE_CREDIT_LIMIT_SQL = (
    "CASE WHEN settlement_failed_at IS NULL THEN credit_limit_micros ELSE 0 END"
)
ADMITS_SQL = (
    "usage_micros - paid_micros + held_micros + {cost} <= " + EFFECTIVE_CREDIT_LIMIT_SQL
)

READ_BALANCE = f"""
SELECT usage_micros, paid_micros, held_micros, credit_limit_micros,
       settlement_failed_at IS NOT NULL AS settlement_failed
FROM {accounts.name} WHERE id = $1
"""


@dataclass(frozen=True, slots=True)
class AccountBalance:
    """An account's running totals at one moment, and what the rule makes of them."""

    usage_micros: int
    paid_micros: int
    held_micros: int
    credit_limit_micros: int
    settlement_failed: bool

    def __post_init__(self) -> None:
        assert min(self.usage_micros, self.paid_micros, self.held_micros) >= 0
        assert self.credit_limit_micros >= 0

    @property
    def balance_micros(self) -> int:
        return self.usage_micros - self.paid_micros

    @property
    def effective_credit_limit_micros(self) -> int:
        return 0 if self.settlement_failed else self.credit_limit_micros

    @property
    def available_micros(self) -> int:
        """What a new request may still reserve (negative only after an overrun)."""
        return self.effective_credit_limit_micros - self.balance_micros - self.held_micros

    def admits(self, max_cost_micros: int) -> bool:
        return max_cost_micros <= self.available_micros

    def refusal(self, max_cost_micros: int) -> CreditLimitExceeded:
        """The 402 for a request of ``max_cost_micros`` this balance does not admit."""
        return CreditLimitExceeded(
            balance_micros=self.balance_micros,
            held_micros=self.held_micros,
            max_cost_micros=max_cost_micros,
            credit_limit_micros=self.effective_credit_limit_micros,
            code="settlement_failed" if self.settlement_failed else None,
        )

    @classmethod
    def from_row(cls, row: Any) -> AccountBalance:
        return cls(
            usage_micros=row["usage_micros"],
            paid_micros=row["paid_micros"],
            held_micros=row["held_micros"],
            credit_limit_micros=row["credit_limit_micros"],
            settlement_failed=row["settlement_failed"],
        )


async def read_balance(engine: AsyncEngine, account_id: int) -> AccountBalance:
    """The account's totals as last committed."""
    rows = await driver.fetch(engine, READ_BALANCE, account_id)
    if not rows:
        raise NotFound("account not found", code="account_not_found")
    return AccountBalance.from_row(rows[0])
