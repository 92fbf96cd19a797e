"""The two ways the worker runs: ``tollgate settle`` (one pass, as a process) and the loop a
Tollgate with an operator key starts by itself. Both use the default policy (collect from
1 USD), and their own operator wallet, as separate processes would."""

from __future__ import annotations

import asyncio
import os
import sys

from sqlalchemy.ext.asyncio import AsyncEngine

from app.config.catalog import Catalog
from app.http.app import Backends
from app.settlement.setup import SETTLEMENT_LOOP
from tests.conftest import ANVIL_OPERATOR_KEY, REPO, DevChain, make_settings, start_tollgate
from tests.identity.smart_accounts import SmartAccounts
from tests.settlement.test_worker import assert_collected_once, indebted_payer

DUE_MICROS = 1_250_000  # over the default threshold
COMMAND_TIMEOUT_S = 60


async def settle_command(env: dict[str, str]) -> tuple[int, str, str]:
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith("TOLLGATE_") and k != "DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "settle", env={**inherited, **env}, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_tollgate_settle_runs_one_pass(
    engine: AsyncEngine, postgres_url: str, dev_chain: DevChain, smart_accounts: SmartAccounts,
) -> None:
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=DUE_MICROS)
    env = {
        "DATABASE_URL": postgres_url,
        "TOLLGATE_CHAIN_RPC_URL": dev_chain.url,
        "TOLLGATE_CHAIN_ID": str(dev_chain.deployment.chain_id),
        "TOLLGATE_TOKEN_ADDRESS": dev_chain.deployment.token,
        "TOLLGATE_SETTLEMENT_ADDRESS": dev_chain.deployment.settlement,
        "TOLLGATE_OPERATOR_PRIVATE_KEY": ANVIL_OPERATOR_KEY,
    }
    status, out, err = await settle_command(env)
    assert status == 0, (out, err)
    assert "tollgate settle: opened" in out and "failed 0" in out
    await assert_collected_once(engine, dev_chain, payer, DUE_MICROS)

    without_key = {k: v for k, v in env.items() if k != "TOLLGATE_OPERATOR_PRIVATE_KEY"}
    status, out, err = await settle_command(without_key)
    assert status == 2 and "TOLLGATE_OPERATOR_PRIVATE_KEY" in err


async def test_a_tollgate_with_an_operator_key_settles_by_itself(
    engine: AsyncEngine, catalog: Catalog, backends: Backends, dev_chain: DevChain,
    smart_accounts: SmartAccounts,
) -> None:
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=DUE_MICROS)
    running = await start_tollgate(make_settings(), catalog, Backends(
        backends.database_url, backends.redis_url, dev_chain.config()))
    try:
        report = await asyncio.wait_for(
            running.app[SETTLEMENT_LOOP].wait_for_passes(1), COMMAND_TIMEOUT_S)
        assert report.ok, report
    finally:
        await running.runner.cleanup()
    await assert_collected_once(engine, dev_chain, payer, DUE_MICROS)
