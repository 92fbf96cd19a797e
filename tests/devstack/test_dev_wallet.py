"""`tollgate dev-wallet` signs locally, keeps its keys local, and gets a working token; on a
dev chain it also funds the wallet, creates its smart account and grants its session key."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import cast

import aiohttp
from sqlalchemy import select

from app.chain.contracts import bind_contract
from app.devstack.dev_wallet import describe, run_dev_wallet
from app.storage.database import create_engine
from app.storage.tables import vouchers
from tests.conftest import MockUpstream, RunningTollgate
from tests.devstack.conftest import ChainState

USDC = 10**6


async def dev_wallet(url: str, state_dir: Path) -> dict[str, object]:
    # Asynchronous: the Tollgate under test is served by this very event loop.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "dev-wallet", "--url", url, "--state-dir", str(state_dir),
        "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout)  # type: ignore[no-any-return]


async def test_dev_wallet_token_works_and_the_wallet_is_reused(
    tollgate: RunningTollgate, tmp_path: Path
) -> None:
    first = await dev_wallet(tollgate.url, tmp_path)
    second = await dev_wallet(tollgate.url, tmp_path)
    assert first["wallet"] == second["wallet"], "one dev wallet per state dir"
    assert first["account"] == second["account"]
    assert first["session_key"] != second["session_key"], "a fresh session key each time"
    key_file = tmp_path / "dev-wallet.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    headers = {"Authorization": f"Bearer {second['token']}"}
    async with aiohttp.ClientSession(headers=headers) as http, http.post(
        f"{tollgate.v1}/chat/completions",
        json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        assert response.status == 200


def test_dev_wallet_explains_a_server_that_is_not_tollgate(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "dev-wallet", "--url", mock_upstream.root,
         "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "does not answer as Tollgate does" in result.stderr
    assert "Traceback" not in result.stderr


def test_dev_wallet_explains_an_unreachable_server(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "dev-wallet", "--url", "http://127.0.0.1:9",
         "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "is `tollgate serve` running" in result.stderr
    assert "Traceback" not in result.stderr


async def test_dev_wallet_on_a_dev_chain_is_funded_and_signs_with_its_session_key(
    chain_state: ChainState, chain_tollgate: RunningTollgate, postgres_url: str
) -> None:
    first = await dev_wallet(chain_tollgate.url, chain_state.state_dir)
    client, deployment = chain_state.client, chain_state.chain.deployment
    wallet = cast(dict[str, str], first["wallet"])["address"]
    session_key = cast(dict[str, str], first["session_key"])["address"]
    smart_account = str(first["smart_account"])
    assert cast(dict[str, int], first["dev_chain"])["transactions_sent"] > 0

    # Everything the output claims is read back from the chain.
    usdc = bind_contract(client.w3, "TestUSDC", deployment.token)
    assert await client.rpc(client.w3.eth.get_balance(wallet)) >= 10**18  # type: ignore[arg-type]
    assert await client.read(usdc.functions.balanceOf(wallet)) == 100 * USDC
    assert await client.read(usdc.functions.balanceOf(smart_account)) == 100 * USDC
    factory = bind_contract(client.w3, "TollgateAccountFactory", deployment.factory)
    assert await client.read(factory.functions.getAddress(wallet, 0)) == smart_account
    account = bind_contract(client.w3, "TollgateAccount", smart_account)
    assert await client.read(account.functions.owner()) == wallet
    policy, live = await client.read(account.functions.sessionPolicy(session_key))
    assert live
    token, payee, cap_per_period, period_s, valid_until = policy
    assert (token, payee) == (deployment.token, deployment.settlement)
    assert cap_per_period == 50 * USDC and period_s == 24 * 3600
    block = await client.rpc(client.w3.eth.get_block("latest"))
    assert valid_until > block["timestamp"] + 29 * 24 * 3600
    assert stat.S_IMODE((chain_state.state_dir / "dev-session-key.json").stat().st_mode) == 0o600

    # A second run reuses the wallet, the account and the key: no transaction, a new token.
    second = await dev_wallet(chain_tollgate.url, chain_state.state_dir)
    assert (second["wallet"], second["session_key"], second["smart_account"]) == (
        first["wallet"], first["session_key"], first["smart_account"])
    assert cast(dict[str, int], second["dev_chain"])["transactions_sent"] == 0
    assert second["account"] == first["account"]
    assert second["token"] != first["token"]

    headers = {"Authorization": f"Bearer {second['token']}"}
    async with aiohttp.ClientSession(headers=headers) as http, http.get(
        f"{chain_tollgate.v1}/account"
    ) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["smart_account"].lower() == smart_account.lower()
    assert body["chain_id"] == 31337

    # The session key gave Tollgate a voucher, so the operator can collect on its own.
    engine = create_engine(postgres_url)
    try:
        async with engine.connect() as connection:
            stored = (await connection.execute(
                select(vouchers.c.cumulative_micros, vouchers.c.settlement)
                .where(vouchers.c.session_key == session_key.lower()))).all()
    finally:
        await engine.dispose()
    assert [(row.cumulative_micros, row.settlement) for row in stored] == [
        (1000 * USDC, deployment.settlement.lower())]


async def test_dev_wallet_text_names_every_key_as_dev_chain_only(
    chain_state: ChainState, chain_tollgate: RunningTollgate
) -> None:
    session = await run_dev_wallet(chain_tollgate.url, chain_state.state_dir)
    assert session.chain is not None
    text = describe(session, chain_tollgate.url)
    assert "exist only on this dev chain" in text
    for key in (session.wallet, session.session_key):
        assert key.address in text and "0x" + bytes(key.key).hex() in text
    assert session.chain.smart_account in text
    assert "100.000000 USDC" in text and "50.000000 USDC per 24 h" in text
    assert f"export TOLLGATE_TOKEN={session.token}" in text
