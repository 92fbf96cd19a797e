"""The matching rules, case by case, without a chain or a database."""

from __future__ import annotations

from typing import Any

from app.reconcile.matching import match
from app.reconcile.records import LedgerEntry, SettledEvent, TokenTransfer
from app.reconcile.report import Category

PAYER = "0x" + "aa" * 20
OTHER = "0x" + "bb" * 20
TX = "0x" + "01" * 32
REFERENCE = "0x" + "0f" * 32


def entry(**overrides: Any) -> LedgerEntry:
    values: dict[str, Any] = {
        "kind": "payment", "reference": REFERENCE, "account_id": 7, "chain_id": 31337,
        "amount_micros": 1_000, "status": "confirmed", "tx_hash": TX, "payer": PAYER,
    }
    values.update(overrides)
    return LedgerEntry(**values)


def event(**overrides: Any) -> SettledEvent:
    values: dict[str, Any] = {
        "reference": REFERENCE, "payer": PAYER, "amount_micros": 1_000, "method": 3,
        "tx_hash": TX, "block_number": 5, "log_index": 1,
    }
    values.update(overrides)
    return SettledEvent(**values)


def transfer(**overrides: Any) -> TokenTransfer:
    values: dict[str, Any] = {"sender": PAYER, "amount_micros": 1_000, "tx_hash": TX,
                              "block_number": 5, "log_index": 0}
    values.update(overrides)
    return TokenTransfer(**values)


def categories(entries: list[LedgerEntry], events: list[SettledEvent],
               transfers: list[TokenTransfer]) -> list[tuple[Category, str]]:
    return [(finding.category, finding.source) for finding in match(entries, events, transfers)]


def test_a_settled_payment_explains_its_own_transfer() -> None:
    assert categories([entry()], [event()], [transfer()]) == [(Category.MATCHED, "payment")]


def test_a_settlement_row_matches_its_collect_event() -> None:
    row = entry(kind="settlement", payer=OTHER)
    assert categories([row], [event(payer=OTHER, method=1)], [transfer(sender=OTHER)]) == [
        (Category.MATCHED, "settlement")]


def test_every_disagreement_is_named() -> None:
    (finding,) = match([entry(amount_micros=900, payer=OTHER, tx_hash="0x" + "02" * 32)],
                       [event()], [])
    assert finding.category is Category.AMOUNT_MISMATCH
    assert finding.detail.split("; ") == [
        "amount: ledger 900, chain 1000",
        f"payer: ledger {OTHER}, chain {PAYER}",
        f"tx hash: ledger 0x{'02' * 32}, chain {TX}",
    ]


def test_a_confirmed_row_without_a_tx_hash_disagrees_a_pending_one_waits() -> None:
    assert categories([entry(tx_hash=None)], [event()], []) == [
        (Category.AMOUNT_MISMATCH, "payment")]
    assert categories([entry(tx_hash=None, status="pending")], [event()], []) == [
        (Category.PENDING, "payment")]


def test_a_failed_row_whose_money_arrived_is_missing_in_the_ledger() -> None:
    (finding,) = match([entry(status="failed")], [event()], [])
    assert finding.category is Category.MISSING_IN_LEDGER
    assert "not credited" in finding.detail


def test_rows_with_nothing_on_chain() -> None:
    rows = [entry(reference="0x01"), entry(reference="0x02", status="pending"),
            entry(reference="0x03", status="failed", tx_hash=None)]
    assert [finding.category for finding in match(rows, [], [])] == [
        Category.MISSING_ON_CHAIN, Category.PENDING, Category.FAILED]


def test_a_facilitator_payment_is_matched_by_transfer_and_its_amount_checked() -> None:
    assert categories([entry()], [], [transfer()]) == [(Category.MATCHED, "payment")]
    (finding,) = match([entry()], [], [transfer(amount_micros=999)])
    assert (finding.category, finding.chain_amount_micros) == (Category.AMOUNT_MISMATCH, 999)


def test_a_transfer_in_another_transaction_or_from_another_payer_does_not_match() -> None:
    found = categories([entry()], [], [transfer(tx_hash="0x" + "03" * 32)])
    assert found == [(Category.MISSING_ON_CHAIN, "payment"),
                     (Category.MISSING_IN_LEDGER, "token_transfer")]
    found = categories([entry()], [], [transfer(sender=OTHER)])
    assert found == [(Category.MISSING_ON_CHAIN, "payment"),
                     (Category.MISSING_IN_LEDGER, "token_transfer")]


def test_a_settlement_is_never_matched_by_a_bare_transfer() -> None:
    # Collections always go through the contract, which always emits Settled.
    found = categories([entry(kind="settlement")], [], [transfer()])
    assert found == [(Category.MISSING_ON_CHAIN, "settlement"),
                     (Category.MISSING_IN_LEDGER, "token_transfer")]


def test_one_transaction_paying_twice_matches_row_by_row() -> None:
    rows = [entry(reference="0x01", amount_micros=5), entry(reference="0x02", amount_micros=7)]
    transfers = [transfer(amount_micros=7, log_index=0), transfer(amount_micros=5, log_index=1)]
    assert [finding.category for finding in match(rows, [], transfers)] == [
        Category.MATCHED, Category.MATCHED]


def test_events_and_transfers_no_row_explains() -> None:
    findings = match([], [event(), event(log_index=9)], [transfer(), transfer(log_index=4)])
    assert [(f.category, f.source) for f in findings] == [
        (Category.MISSING_IN_LEDGER, "settled_event"),
        (Category.MISSING_IN_LEDGER, "settled_event"),  # the same reference twice
        # The two Settled events explain both transfers of their transaction.
    ]
    assert "a second Settled event" in findings[1].detail
