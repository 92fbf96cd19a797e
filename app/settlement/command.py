"""``tollgate settle``: one settlement pass from the command line, then exit.

It needs what the in-process worker has: the database (``DATABASE_URL``, migrated) and a
configured chain with the operator's key (``TOLLGATE_CHAIN_RPC_URL`` and its companions,
``TOLLGATE_OPERATOR_PRIVATE_KEY``). It waits for the collections it drives to be confirmed
(up to the worker's wait), so a cron job sees the outcome. Running it while servers run
their own loops is safe: they share nothing but Postgres and the chain.

Exit status: 0 when nothing failed, 1 when a collection failed or the chain could not be
asked about every account (rerun later), 2 when it is not configured to run.
"""

from __future__ import annotations

import asyncio
import sys

from eth_account import Account
from sqlalchemy.exc import SQLAlchemyError

from app.chain.client import ChainClient
from app.chain.config import ChainConfig, chain_config_from_settings
from app.chain.errors import ChainError
from app.chain.operator import OperatorWallet
from app.config.settings import Settings
from app.settlement.contract import SettlementContract
from app.settlement.vouchers import VoucherDomain, VoucherStore
from app.settlement.worker import (
    DEFAULT_POLICY,
    PassReport,
    SettlementPolicy,
    SettlementWorker,
    policy_from_settings,
)
from app.storage.database import create_engine, pending_migrations

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_NOT_CONFIGURED = 2


class NotReady(Exception):
    """The database or the chain cannot be used for a pass; the message says why."""


def run_settle(settings: Settings) -> int:
    """The command: one pass, a one-line summary, and the exit status."""
    chain = chain_config_from_settings(settings)
    if settings.database_url is None or chain is None or chain.operator_private_key is None:
        print("tollgate settle: needs DATABASE_URL, TOLLGATE_CHAIN_RPC_URL (with"
              " TOLLGATE_CHAIN_ID, TOLLGATE_TOKEN_ADDRESS, TOLLGATE_SETTLEMENT_ADDRESS) and"
              " TOLLGATE_OPERATOR_PRIVATE_KEY", file=sys.stderr)
        return EXIT_NOT_CONFIGURED
    try:
        report = asyncio.run(settle_once(settings.database_url.get_secret_value(), chain,
                                         policy_from_settings(settings)))
    except NotReady as error:
        print(f"tollgate settle: {error}", file=sys.stderr)
        return EXIT_NOT_CONFIGURED
    except ChainError as error:
        # The RPC URL is never printed: hosted RPC URLs carry API keys.
        print(f"tollgate settle: the chain cannot be used: {type(error).__name__}: {error}",
              file=sys.stderr)
        return EXIT_INCOMPLETE
    except (SQLAlchemyError, OSError, TimeoutError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"tollgate settle: database: {type(error).__name__}: {first_line}",
              file=sys.stderr)
        return EXIT_INCOMPLETE
    print(f"tollgate settle: {report.summary()}", flush=True)
    for reason in report.failures:
        print(f"tollgate settle: failed: {reason}", flush=True)
    return EXIT_OK if report.ok else EXIT_INCOMPLETE


async def settle_once(database_url: str, chain: ChainConfig,
                      policy: SettlementPolicy = DEFAULT_POLICY) -> PassReport:
    """One pass of a worker built from ``chain`` (which must carry the operator key)."""
    assert chain.operator_private_key is not None
    engine = create_engine(database_url)
    try:
        if await pending_migrations(engine):
            raise NotReady("the database schema is behind: run `tollgate migrate`")
        client = await ChainClient.connect(chain.rpc_url, chain.chain_id,
                                           call_timeout_s=chain.call_timeout_s)
        try:
            domain = VoucherDomain(chain_id=chain.chain_id, settlement=chain.settlement,
                                   token=chain.token)
            worker = SettlementWorker(
                engine, SettlementContract(client, chain.settlement),
                OperatorWallet(client, Account.from_key(chain.operator_private_key)),
                VoucherStore(engine, domain), confirmations=chain.confirmations,
                policy=policy)
            return await worker.run_pass()
        finally:
            await client.close()
    finally:
        await engine.dispose()
