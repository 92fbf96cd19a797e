"""Reconciliation: the ledger against the chain, and the ledger against itself.

    ledger_rows   payments and settlements, and the invariant checks, in one snapshot
    chain_logs    Settled events and token transfers into the settlement contract
    matching      rows against events (pure): matched, pending, missing, mismatched
    invariants    the ledger's own rules, turned into breaches (pure)
    reconciler    reads both sides in the right order and builds the report
    report        what was found; render turns it into a table, JSON or CSV
    command       ``tollgate reconcile``; the admin API serves the same report
"""
