"""One reconciliation run: the ledger snapshot first, then the chain, then the matching.

The order matters: a payment or settlement row is written (pending) before its
transaction is sent, so every event mined before the chain is read has its row in a
snapshot taken earlier. Reading the chain first would report a payment made in between
as money missing from the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from app.reconcile.chain_logs import ChainLogs
from app.reconcile.invariants import HOLD_OVERDUE_GRACE_S
from app.reconcile.ledger_rows import read_ledger
from app.reconcile.matching import match
from app.reconcile.records import LedgerEntry, SettledEvent, TokenTransfer
from app.reconcile.report import ChainScope, Report

Logged = TypeVar("Logged", SettledEvent, TokenTransfer)

NO_CHAIN = "no chain is configured: only the ledger's invariants were checked"


class BlockRangeInvalid(ValueError):
    """The requested block range is empty or beyond the chain's latest block."""


async def reconcile(
    engine: AsyncEngine,
    chain: ChainLogs | None,
    *,
    from_block: int | None = None,
    to_block: int | None = None,
    chain_skipped: str = NO_CHAIN,
    hold_grace_s: int = HOLD_OVERDUE_GRACE_S,
) -> Report:
    """The report. Without `from_block` the scan starts where the settlement contract was
    deployed; without `to_block` it ends at the latest block."""
    ledger = await read_ledger(engine, with_entries=chain is not None, hold_grace_s=hold_grace_s)
    if chain is None:
        return Report(datetime.now(UTC), (), ledger.breaches, None, chain_skipped, ledger.notes)
    latest = await chain.latest_block()
    end = latest if to_block is None else to_block
    start = await chain.deployment_block(latest) if from_block is None else from_block
    if not 0 <= start <= end <= latest:
        raise BlockRangeInvalid(
            f"blocks {start}..{end} are not a range within 0..{latest} (the latest block)")
    ours = [entry for entry in ledger.entries if entry.chain_id == chain.chain_id]
    notes = list(ledger.notes)
    if len(ours) < len(ledger.entries):
        notes.append(f"{len(ledger.entries) - len(ours)} rows on other chains than"
                     f" {chain.chain_id} were not checked")
    events = await chain.settled_events(start, end)
    transfers = await chain.transfers_in(start, end)
    outside = _transactions_outside(ours, events, transfers)
    more_events, more_transfers = await chain.receipt_logs(outside)
    findings = match(ours, _unique(events, more_events), _unique(transfers, more_transfers))
    scope = ChainScope(chain.chain_id, chain.settlement, chain.token, start, end, len(outside))
    return Report(datetime.now(UTC), tuple(findings), ledger.breaches, scope, None,
                  tuple(notes))


def _transactions_outside(entries: Sequence[LedgerEntry], events: Sequence[SettledEvent],
                          transfers: Sequence[TokenTransfer]) -> list[str]:
    """Transactions of rows the scan did not explain: they may lie outside its blocks."""
    seen_references = {event.reference for event in events}
    seen_transactions = {event.tx_hash for event in events} | {
        transfer.tx_hash for transfer in transfers}
    wanted = {entry.tx_hash for entry in entries
              if entry.tx_hash is not None and entry.reference not in seen_references
              and entry.tx_hash not in seen_transactions}
    return sorted(wanted)


def _unique(scanned: list[Logged], read: list[Logged]) -> list[Logged]:
    """Both lists, each log once (a receipt may repeat a log the scan already found)."""
    known = {(item.tx_hash, item.log_index) for item in scanned}
    return scanned + [item for item in read if (item.tx_hash, item.log_index) not in known]
