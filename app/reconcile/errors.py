"""Why reconciliation could not run at all (as opposed to running and finding problems).

    ReconcileError          the report could not be built; ``tollgate reconcile`` exits 2
    ├── ChainHistoryUnavailable  the node cannot say where to start reading (no archive state)
    └── TooMuchToReconcile       more rows or logs than one run holds; narrow the block range

Chain and database failures keep their own types (``app.chain.errors``, SQLAlchemy's);
the CLI and the admin API turn all of them into one clear message each.
"""

from __future__ import annotations


class ReconcileError(Exception):
    """Reconciliation could not run; the message says what to change."""


class ChainHistoryUnavailable(ReconcileError):
    """The settlement contract's deployment block could not be found from the node."""


class TooMuchToReconcile(ReconcileError):
    """A bound on rows or logs held in memory was reached."""
