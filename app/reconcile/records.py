"""The two sides being reconciled, as plain values: ledger rows and what the chain shows.

Hex strings (references, hashes, addresses) are lowercase ``0x`` hex on both sides, so
they compare as strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LedgerKind = Literal["payment", "settlement"]


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A payment or settlement row: money the ledger expects on chain under ``reference``."""

    kind: LedgerKind
    reference: str
    account_id: int
    chain_id: int
    amount_micros: int
    status: str  # pending | confirmed | failed
    tx_hash: str | None
    # Who pays on chain: a payment's payer, a settlement's smart account.
    payer: str

    def __post_init__(self) -> None:
        assert self.amount_micros > 0, "the schema refuses non-positive amounts"
        assert self.status in ("pending", "confirmed", "failed"), self.status


@dataclass(frozen=True, slots=True)
class SettledEvent:
    """The settlement contract's ``Settled(payer, amount, method, ref)``."""

    reference: str
    payer: str
    amount_micros: int
    method: int  # 1 session debit, 2 receiveWithAuthorization, 3 transferWithAuthorization
    tx_hash: str
    block_number: int
    log_index: int


@dataclass(frozen=True, slots=True)
class TokenTransfer:
    """The token's ``Transfer(sender, settlement contract, amount)``."""

    sender: str
    amount_micros: int
    tx_hash: str
    block_number: int
    log_index: int
