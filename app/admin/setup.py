"""Installs the admin API: its routes and the reconciliation it serves."""

from __future__ import annotations

from aiohttp import web

from app.admin import routes
from app.admin.reconciliation import RECONCILIATION, Reconciliation
from app.chain.config import ChainConfig


def setup_admin(app: web.Application, *, chain: ChainConfig | None = None) -> None:
    """Install the admin endpoints; with ``chain``, reconciliation reads that chain (through
    the app's chain client) besides checking the ledger. Needs identity installed: revoking
    an account's sessions goes through its session store."""
    app[RECONCILIATION] = Reconciliation(chain)
    base = "/v1/admin"
    app.router.add_get(f"{base}/accounts", routes.list_accounts)
    app.router.add_get(f"{base}/accounts/{{account_id}}", routes.get_account)
    app.router.add_patch(f"{base}/accounts/{{account_id}}", routes.update_account)
    app.router.add_post(f"{base}/accounts/{{account_id}}/revoke-sessions",
                        routes.revoke_sessions)
    app.router.add_get(f"{base}/reconciliation", routes.reconciliation)
