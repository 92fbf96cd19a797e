"""The three renderings of one report: JSON and CSV parse back, the table lines up."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime

from app.reconcile.render import CSV_COLUMNS, as_csv, as_json, as_table
from app.reconcile.report import Breach, Category, ChainScope, Check, Finding, Report

REFERENCE = "0x" + "0f" * 32
TX = "0x" + "01" * 32

FINDINGS = (
    Finding(Category.MATCHED, "payment", "Settled in block 5", reference="0x" + "aa" * 32,
            account_id=1, status="confirmed", ledger_amount_micros=10,
            chain_amount_micros=10, chain_tx_hash=TX, block_number=5),
    Finding(Category.AMOUNT_MISMATCH, "payment", "amount: ledger 15, chain 10",
            reference=REFERENCE, account_id=12, status="confirmed", ledger_amount_micros=15,
            chain_amount_micros=10, ledger_tx_hash=TX, chain_tx_hash=TX, block_number=5),
    Finding(Category.MISSING_IN_LEDGER, "token_transfer", "a transfer, \"quoted\", unexplained",
            chain_amount_micros=1_234_567, chain_tx_hash=TX, block_number=123),
    Finding(Category.PENDING, "settlement", "not on chain yet", reference="0x" + "bb" * 32,
            account_id=3, status="pending", ledger_amount_micros=99),
)
BREACHES = (Breach(Check.HOLD_OVERDUE, "req_1", "open 3600 s past its expiry", account_id=3,
                   recorded_micros=77),)
REPORT = Report(datetime(2026, 11, 24, 10, 0, tzinfo=UTC), FINDINGS, BREACHES,
                ChainScope(31337, "0x" + "cc" * 20, "0x" + "dd" * 20, 1, 200, 2))


def test_json_carries_everything() -> None:
    document = json.loads(json.dumps(as_json(REPORT)))
    assert document["object"] == "reconciliation"
    assert document["reconciles"] is False
    assert document["counts"] == {
        "matched": 1, "pending": 1, "failed": 0, "missing_on_chain": 0,
        "missing_in_ledger": 1, "amount_mismatch": 1, "invariant_breaches": 1}
    assert document["chain"] == {"checked": True, "chain_id": 31337,
                                 "settlement": "0x" + "cc" * 20, "token": "0x" + "dd" * 20,
                                 "from_block": 1, "to_block": 200, "receipts_read": 2}
    assert [f["category"] for f in document["findings"]] == [
        "matched", "amount_mismatch", "missing_in_ledger", "pending"]
    assert document["findings"][1]["account"] == "acct_12"
    assert document["invariants"] == [{
        "check": "hold_overdue", "subject": "req_1", "account": "acct_3",
        "recorded_micros": 77, "expected_micros": None,
        "detail": "open 3600 s past its expiry"}]


def test_json_says_when_the_chain_was_skipped() -> None:
    report = Report(REPORT.generated_at, (), (), None, "no chain configured")
    document = as_json(report)
    assert document["chain"] == {"checked": False, "skipped": "no chain configured"}
    assert document["reconciles"] is True


def test_csv_parses_back_row_for_row() -> None:
    rows = list(csv.DictReader(io.StringIO(as_csv(REPORT))))
    assert len(rows) == len(FINDINGS) + len(BREACHES)
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[2]["detail"] == "a transfer, \"quoted\", unexplained"
    assert (rows[1]["reference"], rows[1]["ledger_amount_micros"]) == (REFERENCE, "15")
    assert (rows[4]["section"], rows[4]["category"], rows[4]["subject"],
            rows[4]["recorded_micros"], rows[4]["expected_micros"]) == (
        "invariant", "hold_overdue", "req_1", "77", "")


def test_the_table_shows_what_needs_a_look_in_aligned_columns() -> None:
    lines = as_table(REPORT).splitlines()
    assert lines[0] == "Tollgate reconciliation, 2026-11-24 10:00:00 UTC (amounts in micro-USD)"
    assert lines[-1] == "DOES NOT RECONCILE: 2 findings, 1 invariant breaches"
    header = lines.index(next(line for line in lines if line.startswith("CATEGORY")))
    block = lines[header:header + 4]
    # Matched rows are only counted; problems and pending rows are listed.
    assert [line.split()[0] for line in block[1:]] == [
        "amount_mismatch", "missing_in_ledger", "pending"]
    # Text columns start, and numbers end, where their header does.
    assert {line.index("payment") for line in block[1:2]} == {block[0].index("SOURCE")}
    chain_end = block[0].index("CHAIN") + len("CHAIN")
    assert [line[:chain_end].split()[-1] for line in block[1:]] == ["10", "1234567", "-"]
    assert "0x0f0f0f0f..0f0f0f" in block[1]
    assert any(line.startswith("hold_overdue") for line in lines)


def test_a_clean_report_says_so() -> None:
    report = Report(REPORT.generated_at, FINDINGS[:1], (), REPORT.chain)
    table = as_table(report)
    assert "1 matched" in table and "CATEGORY" not in table
    assert table.endswith("RECONCILES")
