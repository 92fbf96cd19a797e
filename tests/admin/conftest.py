from tests.reconcile.world import ledger_template, world

__all__ = ["ledger_template", "world"]
