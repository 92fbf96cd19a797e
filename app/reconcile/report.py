"""What reconciliation found: one finding per ledger row or on-chain transfer, one breach
per broken ledger invariant, and whether the whole reconciles.

A finding's category says how a row and the chain agree:

    matched            confirmed in the ledger, and the chain shows the same money
    pending            the ledger has not resolved it yet (on chain or not): not a problem
    failed             failed in the ledger, and nothing reached the chain: not a problem
    missing_on_chain   confirmed in the ledger, but no event or transfer shows it
    missing_in_ledger  money reached the settlement contract that no row accounts for
                       (or whose row says it failed)
    amount_mismatch    the row and the chain disagree on amount, payer or tx hash

Every amount is integer micro-USD (one USDC base unit).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Literal


class Category(StrEnum):
    MATCHED = "matched"
    PENDING = "pending"
    FAILED = "failed"
    MISSING_ON_CHAIN = "missing_on_chain"
    MISSING_IN_LEDGER = "missing_in_ledger"
    AMOUNT_MISMATCH = "amount_mismatch"


# The categories that mean the ledger and the chain do not reconcile.
PROBLEMS = frozenset({Category.MISSING_ON_CHAIN, Category.MISSING_IN_LEDGER,
                      Category.AMOUNT_MISMATCH})

# Where a finding comes from: a ledger row, or something seen only on chain.
Source = Literal["payment", "settlement", "settled_event", "token_transfer"]


@dataclass(frozen=True, slots=True)
class Finding:
    """How one ledger row (or one unexplained on-chain transfer) compares with the chain."""

    category: Category
    source: Source
    detail: str
    reference: str | None = None
    account_id: int | None = None
    # The ledger row's status (pending, confirmed, failed); None for chain-only findings.
    status: str | None = None
    ledger_amount_micros: int | None = None
    chain_amount_micros: int | None = None
    ledger_tx_hash: str | None = None
    chain_tx_hash: str | None = None
    block_number: int | None = None

    @property
    def is_problem(self) -> bool:
        return self.category in PROBLEMS


class Check(StrEnum):
    """The ledger's invariants (``app.storage.tables`` states them)."""

    USAGE_TOTAL = "usage_total"  # accounts.usage_micros = sum of its usage records
    PAID_TOTAL = "paid_total"  # paid_micros = its confirmed payments + settlements
    HELD_TOTAL = "held_total"  # held_micros = its open holds
    USAGE_COUNTED_TWICE = "usage_counted_twice"  # one request id, two usage records
    HOLD_NOT_RELEASED = "hold_not_released"  # a request both charged and still held
    HOLD_OVERDUE = "hold_overdue"  # open past its expiry and the grace: no sweeper ran
    REFERENCE_REUSED = "reference_reused"  # one reference on a payment and a settlement


@dataclass(frozen=True, slots=True)
class Breach:
    """One broken ledger invariant: what the ledger records against what its rows say."""

    check: Check
    subject: str  # acct_<id>, a request id or a reference
    detail: str
    account_id: int | None = None
    recorded_micros: int | None = None  # the stored running total (or the hold's amount)
    expected_micros: int | None = None  # what the rows add up to


@dataclass(frozen=True, slots=True)
class ChainScope:
    """Which part of which chain was read."""

    chain_id: int
    settlement: str
    token: str
    from_block: int
    to_block: int
    # Transactions named by ledger rows but not in the scanned blocks, read one by one.
    receipts_read: int


@dataclass(frozen=True, slots=True)
class Report:
    generated_at: datetime
    findings: tuple[Finding, ...]
    breaches: tuple[Breach, ...]
    # Exactly one of these: the chain that was read, or why none was.
    chain: ChainScope | None
    chain_skipped: str | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        assert (self.chain is None) != (self.chain_skipped is None), "chain or a reason"
        assert self.chain is not None or not self.findings, "findings need a chain"

    @property
    def problems(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.is_problem]

    @property
    def reconciles(self) -> bool:
        return not self.breaches and not self.problems

    def counts(self) -> dict[str, int]:
        """Findings per category (every category, zeros included) and breaches."""
        by_category = Counter(finding.category for finding in self.findings)
        counts = {category.value: by_category[category] for category in Category}
        counts["invariant_breaches"] = len(self.breaches)
        return counts
