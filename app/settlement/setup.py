"""Installs settlement: the voucher routes and, with an operator key, the in-process worker.

    tables.py      the vouchers table (migration 0005)
    vouchers.py    DebitVoucher typed data, its digest, parsing, the voucher store
    routes.py      POST /v1/vouchers, GET /v1/vouchers/schema
    reference.py   the derived settlement reference
    contract.py    the settlement contract: reads, collect, Settled events
    store.py       due accounts and the statements that open and resolve a collection
    worker.py      one pass: recover, open, drive to confirmed or failed
    loop.py        the in-process loop around the worker
    command.py     ``tollgate settle``: one pass from the command line

Without a chain there is nothing to collect on and nothing is installed. With a chain but no
operator key, vouchers are still accepted (another process with the key collects).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from app.chain.config import ChainConfig
from app.http.keys import CHAIN, DATABASE, OPERATOR, SETTINGS
from app.settlement.contract import SettlementContract
from app.settlement.loop import SettlementLoop
from app.settlement.routes import VOUCHERS, add_routes
from app.settlement.vouchers import VoucherDomain, VoucherStore
from app.settlement.worker import SettlementWorker, policy_from_settings

SETTLEMENT_LOOP = web.AppKey("settlement_loop", SettlementLoop)


def setup_settlement(app: web.Application, *, chain: ChainConfig | None) -> None:
    """Install settlement for ``chain``; call after the database and chain contexts."""
    if chain is None:
        return
    domain = VoucherDomain(chain_id=chain.chain_id, settlement=chain.settlement,
                           token=chain.token)
    add_routes(app)
    app.cleanup_ctx.append(_vouchers(domain))
    if chain.operator_private_key is not None:
        app.cleanup_ctx.append(_worker(chain))


def _vouchers(domain: VoucherDomain) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        app[VOUCHERS] = VoucherStore(app[DATABASE], domain)
        yield

    return context


def _worker(chain: ChainConfig) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        client = app[CHAIN]
        # The process's one operator wallet: x402 settlements send from it too, and two
        # wallets of one key would take the same nonces.
        settings = app[SETTINGS]
        worker = SettlementWorker(
            app[DATABASE], SettlementContract(client, chain.settlement), app[OPERATOR],
            app[VOUCHERS], confirmations=chain.confirmations,
            policy=policy_from_settings(settings))
        loop = SettlementLoop(worker, interval_s=settings.settlement_interval_s)
        app[SETTLEMENT_LOOP] = loop
        loop.start()
        yield
        await loop.stop()

    return context
