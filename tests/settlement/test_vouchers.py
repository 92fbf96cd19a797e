"""POST /v1/vouchers and GET /v1/vouchers/schema against a Tollgate on the test anvil.

The app here has the chain but no operator key, so it accepts vouchers and runs no worker
(the worker tests drive their own).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chain.contracts import bind_contract
from app.config.catalog import Catalog
from app.http.app import Backends
from app.storage.tables import vouchers
from tests.conftest import DevChain, RunningTollgate, make_settings, start_tollgate
from tests.identity.conftest import assert_error
from tests.identity.smart_accounts import SmartAccounts
from tests.identity.wallets import authorize, bearer
from tests.settlement.conftest import (
    Payer,
    new_payer,
    sign_voucher,
    voucher_deadline,
    voucher_domain,
)


@pytest.fixture(scope="module")
async def voucher_tollgate(catalog: Catalog, backends: Backends, dev_chain: DevChain
                           ) -> AsyncIterator[RunningTollgate]:
    chain = dev_chain.config(operator_private_key=None)
    running = await start_tollgate(make_settings(session_policy_cache_s=0), catalog,
                                   Backends(backends.database_url, backends.redis_url, chain))
    yield running
    await running.runner.cleanup()


async def signed_in(http: aiohttp.ClientSession, tollgate: RunningTollgate, payer: Payer
                    ) -> str:
    """A session of the payer's key on its smart account; returns its token."""
    answer = await authorize(http, tollgate.url, payer.key, smartAccount=payer.account,
                             sessionKey=payer.key.address)
    payer.account_id = int(answer["account"]["id"].removeprefix("acct_"))
    return str(answer["token"])


async def post_voucher(http: aiohttp.ClientSession, tollgate: RunningTollgate, token: str,
                       body: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{tollgate.v1}/vouchers", json=body,
                         headers=bearer(token)) as response:
        return response.status, await response.json()


def voucher_body(dev_chain: DevChain, signer: LocalAccount, account: str, cumulative: int,
                 deadline: int) -> dict[str, Any]:
    return {"cumulativeAmount": str(cumulative), "deadline": deadline,
            "signature": sign_voucher(dev_chain, signer, account, cumulative, deadline)}


async def stored(engine: AsyncEngine, account_id: int) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(
            select(vouchers).where(vouchers.c.account_id == account_id))).mappings())


async def test_the_local_digest_is_the_contracts(dev_chain: DevChain) -> None:
    settlement = bind_contract(dev_chain.client.w3, "TollgateSettlement",
                               dev_chain.deployment.settlement)
    account = Account.create().address
    on_chain = await dev_chain.client.read(
        settlement.functions.voucherDigest(account, 123_456, 1_900_000_000))
    assert voucher_domain(dev_chain).digest(account, 123_456, 1_900_000_000) == bytes(on_chain)


async def test_the_schema_is_what_an_agent_signs(
    http: aiohttp.ClientSession, voucher_tollgate: RunningTollgate, dev_chain: DevChain,
) -> None:
    async with http.get(f"{voucher_tollgate.v1}/vouchers/schema") as response:
        assert response.status == 200
        schema = await response.json()
    assert schema["primaryType"] == "DebitVoucher"
    assert schema["domain"] == {"name": "TollgateSettlement", "version": "1",
                                "chainId": dev_chain.deployment.chain_id,
                                "verifyingContract": dev_chain.deployment.settlement}
    assert schema["types"]["DebitVoucher"] == [
        {"name": "account", "type": "address"}, {"name": "token", "type": "address"},
        {"name": "cumulativeAmount", "type": "uint256"}, {"name": "deadline", "type": "uint256"},
    ]
    assert schema["message"]["token"] == dev_chain.deployment.token


async def test_a_session_key_gives_ever_higher_vouchers(
    http: aiohttp.ClientSession, voucher_tollgate: RunningTollgate, dev_chain: DevChain,
    smart_accounts: SmartAccounts, engine: AsyncEngine,
) -> None:
    payer = await new_payer(smart_accounts, funds_micros=1)
    token = await signed_in(http, voucher_tollgate, payer)
    deadline = await voucher_deadline(smart_accounts)
    body = voucher_body(dev_chain, payer.key, payer.account, 2_000_000, deadline)
    status, answer = await post_voucher(http, voucher_tollgate, token, body)
    assert status == 200, answer
    assert answer["object"] == "voucher"
    assert answer["cumulative_amount"] == "2000000" and answer["deadline"] == deadline
    assert answer["session_key"] == payer.key.address.lower()

    # The same voucher again is a no-op; a higher one replaces it.
    assert (await post_voucher(http, voucher_tollgate, token, body))[0] == 200
    higher = voucher_body(dev_chain, payer.key, payer.account, 3_000_000, deadline)
    status, answer = await post_voucher(http, voucher_tollgate, token, higher)
    assert status == 200, answer
    assert payer.account_id is not None
    rows = await stored(engine, payer.account_id)
    assert len(rows) == 1
    assert rows[0]["cumulative_micros"] == 3_000_000
    assert rows[0]["signature"] == higher["signature"].lower()

    # Lower than the stored one: refused, and the stored one stays.
    status, answer = await post_voucher(http, voucher_tollgate, token, body)
    assert_error(status, answer, 400, "voucher_not_increasing", param="cumulativeAmount")
    assert (await stored(engine, payer.account_id))[0]["cumulative_micros"] == 3_000_000


async def test_vouchers_signed_by_anyone_but_the_sessions_key_are_refused(
    http: aiohttp.ClientSession, voucher_tollgate: RunningTollgate, dev_chain: DevChain,
    smart_accounts: SmartAccounts, engine: AsyncEngine,
) -> None:
    payer = await new_payer(smart_accounts, funds_micros=1)
    other = await new_payer(smart_accounts, funds_micros=1)
    token = await signed_in(http, voucher_tollgate, payer)
    deadline = await voucher_deadline(smart_accounts)
    refused = [
        # A stranger's key, the account's owner (not the session's key), and another
        # account's session key signing for this account or for its own account.
        voucher_body(dev_chain, Account.create(), payer.account, 1_000, deadline),
        voucher_body(dev_chain, payer.owner, payer.account, 1_000, deadline),
        voucher_body(dev_chain, other.key, payer.account, 1_000, deadline),
        voucher_body(dev_chain, other.key, other.account, 1_000, deadline),
        # The right key signing for the other account.
        voucher_body(dev_chain, payer.key, other.account, 1_000, deadline),
    ]
    for body in refused:
        status, answer = await post_voucher(http, voucher_tollgate, token, body)
        assert_error(status, answer, 400, "invalid_voucher_signature", param="signature")
    # A signed voucher whose amount was changed after signing.
    body = voucher_body(dev_chain, payer.key, payer.account, 1_000, deadline)
    status, answer = await post_voucher(http, voucher_tollgate, token,
                                        {**body, "cumulativeAmount": "1000000"})
    assert_error(status, answer, 400, "invalid_voucher_signature")
    assert payer.account_id is not None
    assert await stored(engine, payer.account_id) == []


async def test_malformed_vouchers_name_their_field(
    http: aiohttp.ClientSession, voucher_tollgate: RunningTollgate, dev_chain: DevChain,
    smart_accounts: SmartAccounts,
) -> None:
    payer = await new_payer(smart_accounts, funds_micros=1)
    token = await signed_in(http, voucher_tollgate, payer)
    deadline = await voucher_deadline(smart_accounts)
    good = voucher_body(dev_chain, payer.key, payer.account, 1_000, deadline)
    cases: list[tuple[Any, str, str]] = [
        ({k: v for k, v in good.items() if k != "deadline"}, "missing_parameter", "deadline"),
        ({**good, "cumulativeAmount": 1000}, "invalid_amount", "cumulativeAmount"),
        ({**good, "cumulativeAmount": "0"}, "invalid_amount", "cumulativeAmount"),
        ({**good, "cumulativeAmount": "1e3"}, "invalid_amount", "cumulativeAmount"),
        ({**good, "cumulativeAmount": str(2**63)}, "invalid_amount", "cumulativeAmount"),
        ({**good, "deadline": 5}, "voucher_expires_too_soon", "deadline"),
        ({**good, "deadline": "soon"}, "invalid_type", "deadline"),
        ({**good, "signature": "0x1234"}, "malformed_signature", "signature"),
        ({**good, "account": payer.account}, "unknown_parameter", "account"),
    ]
    for body, code, param in cases:
        status, answer = await post_voucher(http, voucher_tollgate, token, body)
        assert_error(status, answer, 400, code, param=param)
    async with http.post(f"{voucher_tollgate.v1}/vouchers", json=good) as response:
        assert response.status == 401, "a voucher needs a session"


async def test_an_account_that_is_not_a_contract_cannot_give_vouchers(
    http: aiohttp.ClientSession, voucher_tollgate: RunningTollgate, dev_chain: DevChain,
    smart_accounts: SmartAccounts,
) -> None:
    wallet: LocalAccount = Account.create()
    key: LocalAccount = Account.create()
    answer = await authorize(http, voucher_tollgate.url, wallet, sessionKey=key.address)
    deadline = await voucher_deadline(smart_accounts)
    body = voucher_body(dev_chain, key, wallet.address, 1_000, deadline)
    status, error = await post_voucher(http, voucher_tollgate, answer["token"], body)
    assert_error(status, error, 400, "smart_account_required")
