"""Ledger rows against on-chain money: pure, so every case is testable without a chain.

A row is matched to the chain by its reference first: the settlement contract emits
``Settled(payer, amount, method, ref)`` for every collection and payment it performs.
A payment with no such event (an x402 facilitator paid the settlement contract
straight through the token, or someone submitted the payer's authorization to the
token first) is matched by its transaction instead: the token's
``Transfer(payer, settlement, amount)`` log in the row's ``tx_hash``.

Every token transfer into the settlement contract must be explained, by a ``Settled``
event in its own transaction (the contract emits it only after measuring that exactly
that amount arrived) or by a payment row naming its transaction; the rest is money
that no row accounts for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from app.reconcile.records import LedgerEntry, SettledEvent, TokenTransfer
from app.reconcile.report import Category, Finding


def match(entries: Sequence[LedgerEntry], events: Sequence[SettledEvent],
          transfers: Sequence[TokenTransfer]) -> list[Finding]:
    """One finding per row, then one per event and per transfer that no row explains."""
    events_by_reference: dict[str, SettledEvent] = {}
    repeated: list[SettledEvent] = []
    for event in events:
        # The contract refuses a used reference, so a repeat means another contract's
        # events were mixed in or the node is wrong: reported, never silently merged.
        if event.reference in events_by_reference:
            repeated.append(event)
        else:
            events_by_reference[event.reference] = event
    pool = _TransferPool(transfers)
    for event in events:
        pool.take(event.tx_hash, event.payer, event.amount_micros)
    findings: list[Finding] = []
    referenced: set[str] = set()
    for entry in entries:
        settled = events_by_reference.get(entry.reference)
        if settled is not None:
            referenced.add(entry.reference)
            findings.append(_against_event(entry, settled))
        else:
            findings.append(_without_event(entry, pool))
    assert len(findings) == len(entries), "one finding per ledger row"
    for event in events_by_reference.values():
        if event.reference not in referenced:
            findings.append(_unknown_event(event, "no ledger row has this reference"))
    for event in repeated:
        findings.append(_unknown_event(event, "a second Settled event with this reference"))
    for transfer in pool.remaining():
        findings.append(Finding(
            Category.MISSING_IN_LEDGER, "token_transfer",
            f"a transfer from {transfer.sender} to the settlement contract that no payment"
            " row or Settled event explains",
            chain_amount_micros=transfer.amount_micros, chain_tx_hash=transfer.tx_hash,
            block_number=transfer.block_number,
        ))
    return findings


class _TransferPool:
    """Transfers not yet explained, by transaction; each explains at most one thing."""

    def __init__(self, transfers: Iterable[TokenTransfer]) -> None:
        self._by_tx: dict[str, list[TokenTransfer]] = defaultdict(list)
        for transfer in transfers:
            self._by_tx[transfer.tx_hash].append(transfer)

    def take(self, tx_hash: str, sender: str, amount_micros: int | None) -> TokenTransfer | None:
        """Remove and return a transfer of `tx_hash` from `sender` (of exactly
        `amount_micros` if given)."""
        candidates = self._by_tx.get(tx_hash, [])
        for index, transfer in enumerate(candidates):
            if transfer.sender == sender and amount_micros in (None, transfer.amount_micros):
                return candidates.pop(index)
        return None

    def remaining(self) -> list[TokenTransfer]:
        left = [transfer for transfers in self._by_tx.values() for transfer in transfers]
        return sorted(left, key=lambda transfer: (transfer.block_number, transfer.log_index))


def _row_finding(entry: LedgerEntry, category: Category, detail: str, *,
                 chain_amount_micros: int | None = None, chain_tx_hash: str | None = None,
                 block_number: int | None = None) -> Finding:
    return Finding(
        category, entry.kind, detail, reference=entry.reference, account_id=entry.account_id,
        status=entry.status, ledger_amount_micros=entry.amount_micros,
        chain_amount_micros=chain_amount_micros, ledger_tx_hash=entry.tx_hash,
        chain_tx_hash=chain_tx_hash, block_number=block_number,
    )


def _disagreements(entry: LedgerEntry, *, amount_micros: int, payer: str,
                   tx_hash: str) -> list[str]:
    found = []
    if amount_micros != entry.amount_micros:
        found.append(f"amount: ledger {entry.amount_micros}, chain {amount_micros}")
    if payer != entry.payer:
        found.append(f"payer: ledger {entry.payer}, chain {payer}")
    if entry.tx_hash is None:
        if entry.status == "confirmed":
            found.append(f"tx hash: ledger none, chain {tx_hash}")
    elif entry.tx_hash != tx_hash:
        found.append(f"tx hash: ledger {entry.tx_hash}, chain {tx_hash}")
    return found


def _resolved(entry: LedgerEntry, what: str, disagreements: list[str]) -> tuple[Category, str]:
    """The category of a row whose money `what` describes on chain."""
    if disagreements:
        return Category.AMOUNT_MISMATCH, "; ".join(disagreements)
    if entry.status == "confirmed":
        return Category.MATCHED, what
    if entry.status == "pending":
        return Category.PENDING, f"{what}; not confirmed in the ledger yet"
    return Category.MISSING_IN_LEDGER, (
        f"the row failed, but {what}: the money arrived and is not credited")


def _against_event(entry: LedgerEntry, event: SettledEvent) -> Finding:
    disagreements = _disagreements(entry, amount_micros=event.amount_micros,
                                   payer=event.payer, tx_hash=event.tx_hash)
    category, detail = _resolved(entry, f"Settled in block {event.block_number}",
                                 disagreements)
    return _row_finding(entry, category, detail, chain_amount_micros=event.amount_micros,
                        chain_tx_hash=event.tx_hash, block_number=event.block_number)


def _without_event(entry: LedgerEntry, pool: _TransferPool) -> Finding:
    transfer = None
    if entry.kind == "payment" and entry.tx_hash is not None:
        # An exact transfer first, so a transaction paying twice matches row by row.
        transfer = (pool.take(entry.tx_hash, entry.payer, entry.amount_micros)
                    or pool.take(entry.tx_hash, entry.payer, None))
    if transfer is not None:
        disagreements = _disagreements(entry, amount_micros=transfer.amount_micros,
                                       payer=transfer.sender, tx_hash=transfer.tx_hash)
        category, detail = _resolved(
            entry, f"paid by token transfer in block {transfer.block_number}", disagreements)
        return _row_finding(entry, category, detail,
                            chain_amount_micros=transfer.amount_micros,
                            chain_tx_hash=transfer.tx_hash, block_number=transfer.block_number)
    if entry.status == "pending":
        return _row_finding(entry, Category.PENDING, "not on chain yet")
    if entry.status == "failed":
        return _row_finding(entry, Category.FAILED, "failed; nothing on chain")
    where = f" or transfer from the payer in {entry.tx_hash}" if entry.tx_hash else ""
    return _row_finding(entry, Category.MISSING_ON_CHAIN,
                        f"confirmed, but no Settled event with this reference{where}")


def _unknown_event(event: SettledEvent, why: str) -> Finding:
    return Finding(
        Category.MISSING_IN_LEDGER, "settled_event",
        f"Settled {event.amount_micros} from {event.payer} (method {event.method}): {why}",
        reference=event.reference, chain_amount_micros=event.amount_micros,
        chain_tx_hash=event.tx_hash, block_number=event.block_number,
    )
