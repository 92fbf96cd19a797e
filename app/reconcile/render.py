"""A report as an aligned table (people), JSON (programs) or CSV (spreadsheets).

JSON and CSV carry every finding, matched ones included, with full hashes; the table
shows the counts, then only what needs a look (problems and pending rows, broken
invariants) with hashes shortened so a row fits a terminal.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from app.identity.tokens import account_reference
from app.reconcile.report import Breach, Category, Finding, Report

CSV_COLUMNS = (
    "section", "category", "source", "reference", "subject", "account", "status",
    "ledger_amount_micros", "chain_amount_micros", "ledger_tx_hash", "chain_tx_hash",
    "block_number", "recorded_micros", "expected_micros", "detail",
)


def _account(account_id: int | None) -> str | None:
    return account_reference(account_id) if account_id is not None else None


def finding_json(finding: Finding) -> dict[str, Any]:
    return {
        "category": finding.category.value, "source": finding.source,
        "reference": finding.reference, "account": _account(finding.account_id),
        "status": finding.status, "ledger_amount_micros": finding.ledger_amount_micros,
        "chain_amount_micros": finding.chain_amount_micros,
        "ledger_tx_hash": finding.ledger_tx_hash, "chain_tx_hash": finding.chain_tx_hash,
        "block_number": finding.block_number, "detail": finding.detail,
    }


def breach_json(breach: Breach) -> dict[str, Any]:
    return {
        "check": breach.check.value, "subject": breach.subject,
        "account": _account(breach.account_id), "recorded_micros": breach.recorded_micros,
        "expected_micros": breach.expected_micros, "detail": breach.detail,
    }


def as_json(report: Report) -> dict[str, Any]:
    chain: dict[str, Any]
    if report.chain is None:
        chain = {"checked": False, "skipped": report.chain_skipped}
    else:
        scope = report.chain
        chain = {"checked": True, "chain_id": scope.chain_id, "settlement": scope.settlement,
                 "token": scope.token, "from_block": scope.from_block,
                 "to_block": scope.to_block, "receipts_read": scope.receipts_read}
    return {
        "object": "reconciliation",
        "created": int(report.generated_at.timestamp()),
        "reconciles": report.reconciles,
        "cost_unit": "usd_micros",
        "counts": report.counts(),
        "chain": chain,
        "findings": [finding_json(finding) for finding in report.findings],
        "invariants": [breach_json(breach) for breach in report.breaches],
        "notes": list(report.notes),
    }


def as_csv(report: Report) -> str:
    """One row per finding, then one per breach, under one header."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for finding in report.findings:
        writer.writerow({"section": "finding", **finding_json(finding)})
    for breach in report.breaches:
        row = breach_json(breach)
        writer.writerow({"section": "invariant", "category": row.pop("check"), **row})
    return out.getvalue()


def _short(value: str | None) -> str:
    """A hash or reference cut to its ends, enough to find it in the JSON or CSV."""
    if value is None:
        return "-"
    return value if len(value) <= 18 else f"{value[:10]}..{value[-6:]}"


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]],
           numeric: frozenset[int]) -> list[str]:
    """Columns padded to their widest cell; numbers right-aligned; the last one free."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows,
                                                                         strict=True)]
    lines = []
    for cells in (headers, *rows):
        padded = [
            cell if index == len(cells) - 1
            else cell.rjust(widths[index]) if index in numeric
            else cell.ljust(widths[index])
            for index, cell in enumerate(cells)
        ]
        lines.append("  ".join(padded).rstrip())
    return lines


def as_table(report: Report) -> str:
    when = report.generated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"Tollgate reconciliation, {when} (amounts in micro-USD)"]
    if report.chain is None:
        lines.append(f"chain: skipped ({report.chain_skipped})")
    else:
        scope = report.chain
        lines.append(f"chain {scope.chain_id}: settlement {scope.settlement}, token"
                     f" {scope.token}; blocks {scope.from_block}..{scope.to_block};"
                     f" {scope.receipts_read} receipts read")
    counts = report.counts()
    lines.append("found: " + ", ".join(f"{counts[c.value]} {c.value}" for c in Category)
                 + f"; {counts['invariant_breaches']} invariant breaches")
    shown = [f for f in report.findings if f.is_problem or f.category is Category.PENDING]
    if shown:
        lines += ["", *_table(
            ("CATEGORY", "SOURCE", "REFERENCE", "ACCOUNT", "STATUS", "LEDGER", "CHAIN",
             "BLOCK", "TX", "DETAIL"),
            [(f.category.value, f.source, _short(f.reference), _account(f.account_id) or "-",
              f.status or "-", _number(f.ledger_amount_micros),
              _number(f.chain_amount_micros), _number(f.block_number),
              _short(f.chain_tx_hash or f.ledger_tx_hash), f.detail) for f in shown],
            numeric=frozenset({5, 6, 7}),
        )]
    if report.breaches:
        lines += ["", *_table(
            ("INVARIANT", "SUBJECT", "ACCOUNT", "RECORDED", "EXPECTED", "DETAIL"),
            [(b.check.value, _short(b.subject), _account(b.account_id) or "-",
              _number(b.recorded_micros), _number(b.expected_micros), b.detail)
             for b in report.breaches],
            numeric=frozenset({3, 4}),
        )]
    lines += ["", *(f"note: {note}" for note in report.notes)] if report.notes else []
    problems = len(report.problems)
    verdict = ("RECONCILES" if report.reconciles else
               f"DOES NOT RECONCILE: {problems} findings, {len(report.breaches)}"
               " invariant breaches")
    lines += ["", verdict]
    return "\n".join(lines)
