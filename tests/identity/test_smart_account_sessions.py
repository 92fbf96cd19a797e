"""/v1/authorize for smart accounts, and session keys that lose their sessions on chain.

Against a Tollgate whose chain is the test session's anvil, with Tollgate's contracts
deployed there. Policies are re-read on every request (``session_policy_cache_s=0``)
except where the cache itself is under test.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from app.chain.deploy import ENTRY_POINT_V07, deploy_contract
from app.config.catalog import Catalog
from app.http.app import Backends, ChainUnavailableAtStart, create_app
from app.serve import app_runner
from tests.conftest import (
    TEST_JWT_SECRET,
    DevChain,
    RunningTollgate,
    make_settings,
    start_tollgate,
)
from tests.identity.conftest import assert_error, assert_token_refused
from tests.identity.smart_accounts import (
    RpcProxy,
    SmartAccounts,
    sign_as_account,
    sign_undeployed,
)
from tests.identity.wallets import bearer, digest, message, post_authorization, sign

OTHER_CHAIN_ID = 8453  # supported for EOAs, but not the chain Tollgate reads


@pytest.fixture(scope="module")
def accounts(dev_chain: DevChain) -> SmartAccounts:
    return SmartAccounts(dev_chain)


def chain_settings(**overrides: Any) -> Any:
    return make_settings(chain_ids=(31337, OTHER_CHAIN_ID), **overrides)


@pytest.fixture(scope="module")
async def tollgate_on_chain(catalog: Catalog, postgres_url: str, redis_url: str,
                            dev_chain: DevChain) -> AsyncIterator[RunningTollgate]:
    running = await start_tollgate(chain_settings(session_policy_cache_s=0), catalog,
                                   Backends(postgres_url, redis_url, chain=dev_chain.config()))
    yield running
    await running.runner.cleanup()


@pytest.fixture(scope="module")
async def other_factory(dev_chain: DevChain) -> str:
    """A factory with the same code as Tollgate's, but not allowlisted."""
    return await deploy_contract(dev_chain.client, dev_chain.wallet, "TollgateAccountFactory",
                                 ENTRY_POINT_V07)


@contextlib.asynccontextmanager
async def proxied_tollgate(catalog: Catalog, postgres_url: str, redis_url: str,
                           dev_chain: DevChain, **overrides: Any
                           ) -> AsyncIterator[tuple[RunningTollgate, RpcProxy]]:
    """A Tollgate that reaches the chain through a relay the test can count or stop."""
    proxy = RpcProxy(dev_chain.url)
    url = await proxy.start()
    try:
        running = await start_tollgate(
            chain_settings(**overrides), catalog,
            Backends(postgres_url, redis_url, chain=dev_chain.config(rpc_url=url)))
        try:
            yield running, proxy
        finally:
            await running.runner.cleanup()
    finally:
        await proxy.stop()


async def open_session(http: aiohttp.ClientSession, tollgate: RunningTollgate,
                       body: dict[str, Any], signature: str) -> dict[str, Any]:
    status, answer, _ = await post_authorization(http, tollgate.url, body, signature)
    assert status == 201, answer
    return answer


async def get_account(http: aiohttp.ClientSession, tollgate: RunningTollgate, token: str
                      ) -> tuple[int, dict[str, Any], Any]:
    async with http.get(f"{tollgate.v1}/account", headers=bearer(token)) as response:
        return response.status, await response.json(), response.headers


def claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, TEST_JWT_SECRET, algorithms=["HS256"], audience="tollgate-api")


async def account_with_key(accounts: SmartAccounts, **grant: Any
                           ) -> tuple[LocalAccount, str, LocalAccount]:
    """(owner, deployed account, session key granted to pay the settlement contract)."""
    owner = await accounts.new_owner()
    account = await accounts.deploy(owner)
    key: LocalAccount = Account.create()
    await accounts.grant(owner, account, key.address, **grant)
    return owner, account, key


def key_signs(key: LocalAccount, account: str) -> tuple[dict[str, Any], str]:
    body = message(key, smartAccount=account, sessionKey=key.address)
    return body, sign(key, body)


# -- opening sessions ------------------------------------------------------------------


async def test_the_owner_of_a_deployed_account_opens_a_session_bound_to_its_key(
    http: aiohttp.ClientSession, tollgate_on_chain: RunningTollgate, accounts: SmartAccounts,
) -> None:
    owner, account, key = await account_with_key(accounts)
    body = message(owner, smartAccount=account, sessionKey=key.address)
    issued = await open_session(http, tollgate_on_chain, body, sign(owner, body))
    assert issued["account"]["smartAccount"] == account.lower()
    assert issued["account"]["wallet"] == owner.address.lower()
    assert claims(issued["token"])["session_key_bound"] is True
    assert issued["expiresAt"] == body["expiresAt"], "the policy outlives the session"
    status, answer, _ = await get_account(http, tollgate_on_chain, issued["token"])
    assert status == 200, answer
    assert answer["smart_account"] == account.lower()


async def test_the_deployed_account_itself_signs_with_erc1271(
    http: aiohttp.ClientSession, tollgate_on_chain: RunningTollgate, accounts: SmartAccounts,
) -> None:
    owner, account, key = await account_with_key(accounts)
    body = message(owner, wallet=account, smartAccount=account, sessionKey=key.address)
    signature = sign_as_account(owner, account, accounts.chain_id, digest(body))
    issued = await open_session(http, tollgate_on_chain, body, signature)
    assert issued["account"]["wallet"] == issued["account"]["smartAccount"] == account.lower()
    assert claims(issued["token"])["session_key_bound"] is True
    status, answer, _ = await get_account(http, tollgate_on_chain, issued["token"])
    assert status == 200, answer

    # The owner's bare signature is not the account's: it must be wrapped in its domain.
    body = message(owner, wallet=account, smartAccount=account, sessionKey=key.address)
    status, answer, _ = await post_authorization(http, tollgate_on_chain.url, body,
                                                 sign(owner, body))
    assert_error(status, answer, 401, "signature_mismatch")


async def test_an_undeployed_account_signs_with_erc6492_from_the_allowlisted_factory(
    http: aiohttp.ClientSession, tollgate_on_chain: RunningTollgate, accounts: SmartAccounts,
    other_factory: str,
) -> None:
    owner = await accounts.new_owner()
    factory = accounts.chain.deployment.factory
    account = await accounts.address_of(owner, 7)
    body = message(owner, wallet=account, smartAccount=account)
    signature = sign_undeployed(owner, factory, 7, account, accounts.chain_id, digest(body))
    issued = await open_session(http, tollgate_on_chain, body, signature)
    assert issued["account"]["smartAccount"] == account.lower()
    # Not deployed, so no session keys yet: the session depends on no policy.
    assert claims(issued["token"])["session_key_bound"] is False
    status, answer, _ = await get_account(http, tollgate_on_chain, issued["token"])
    assert status == 200, answer

    # The same owner's account from a factory Tollgate does not trust is refused.
    elsewhere = await accounts.address_of(owner, 7, factory=other_factory)
    body = message(owner, wallet=elsewhere, smartAccount=elsewhere)
    signature = sign_undeployed(owner, other_factory, 7, elsewhere, accounts.chain_id,
                                digest(body))
    status, answer, _ = await post_authorization(http, tollgate_on_chain.url, body, signature)
    assert_error(status, answer, 401, "signature_mismatch")


async def test_a_live_session_key_opens_a_session_that_works(
    http: aiohttp.ClientSession, tollgate_on_chain: RunningTollgate, accounts: SmartAccounts,
) -> None:
    _, account, key = await account_with_key(accounts)
    issued = await open_session(http, tollgate_on_chain, *key_signs(key, account))
    assert issued["account"]["wallet"] == key.address.lower()
    status, answer, _ = await get_account(http, tollgate_on_chain, issued["token"])
    assert status == 200, answer
    assert answer["smart_account"] == account.lower()


async def test_the_token_never_outlives_the_key_policy(
    http: aiohttp.ClientSession, tollgate_on_chain: RunningTollgate, accounts: SmartAccounts,
) -> None:
    owner = await accounts.new_owner()
    account = await accounts.deploy(owner)
    key: LocalAccount = Account.create()
    valid_until_s = await accounts.grant(owner, account, key.address, ttl_s=600)
    body, signature = key_signs(key, account)
    assert body["expiresAt"] > valid_until_s
    issued = await open_session(http, tollgate_on_chain, body, signature)
    assert issued["expiresAt"] == claims(issued["token"])["exp"] == valid_until_s


async def test_a_key_paying_someone_else_is_refused(
    http: aiohttp.ClientSession, tollgate_on_chain: RunningTollgate, accounts: SmartAccounts,
) -> None:
    _, account, key = await account_with_key(accounts, payee=Account.create().address)
    status, answer, _ = await post_authorization(http, tollgate_on_chain.url,
                                                 *key_signs(key, account))
    assert_error(status, answer, 403, "session_key_wrong_payee", "sessionKey")


async def test_wrong_signers_are_refused(
    http: aiohttp.ClientSession, tollgate_on_chain: RunningTollgate, accounts: SmartAccounts,
) -> None:
    owner, account, key = await account_with_key(accounts)
    mallory: LocalAccount = Account.create()
    # Claims to be the owner, signs with another key.
    body = message(owner, smartAccount=account, sessionKey=key.address)
    status, answer, _ = await post_authorization(http, tollgate_on_chain.url, body,
                                                 sign(mallory, body))
    assert_error(status, answer, 401, "signature_mismatch")
    # Signs honestly, but is neither the owner nor the session key.
    body = message(mallory, smartAccount=account, sessionKey=key.address)
    status, answer, _ = await post_authorization(http, tollgate_on_chain.url, body,
                                                 sign(mallory, body))
    assert_error(status, answer, 403, "smart_account_not_owned", "wallet")
    # A key never granted on this account.
    body = message(mallory, smartAccount=account, sessionKey=mallory.address)
    status, answer, _ = await post_authorization(http, tollgate_on_chain.url, body,
                                                 sign(mallory, body))
    assert_error(status, answer, 403, "session_key_not_live", "sessionKey")


async def test_another_supported_chain_is_verified_as_eoas_only(
    http: aiohttp.ClientSession, tollgate_on_chain: RunningTollgate, accounts: SmartAccounts,
) -> None:
    owner, account, key = await account_with_key(accounts)
    body = message(owner, smartAccount=account, sessionKey=key.address,
                   chainId=OTHER_CHAIN_ID)
    status, answer, _ = await post_authorization(http, tollgate_on_chain.url, body,
                                                 sign(owner, body))
    assert_error(status, answer, 403, "smart_account_not_verified", "smartAccount")
    body = message(owner, chainId=OTHER_CHAIN_ID)
    issued = await open_session(http, tollgate_on_chain, body, sign(owner, body))
    assert claims(issued["token"])["session_key_bound"] is False


# -- keeping sessions --------------------------------------------------------------------


async def test_an_expired_key_can_neither_open_nor_keep_a_session(
    http: aiohttp.ClientSession, tollgate_on_chain: RunningTollgate, accounts: SmartAccounts,
) -> None:
    ttl_s = 30
    _, account, key = await account_with_key(accounts, ttl_s=ttl_s)
    issued = await open_session(http, tollgate_on_chain, *key_signs(key, account))
    status, answer, _ = await get_account(http, tollgate_on_chain, issued["token"])
    assert status == 200, answer

    await accounts.advance(ttl_s + 1)
    status, answer, headers = await get_account(http, tollgate_on_chain, issued["token"])
    assert_token_refused(status, answer, headers, "session_key_expired")
    status, answer, _ = await post_authorization(http, tollgate_on_chain.url,
                                                 *key_signs(key, account))
    assert_error(status, answer, 403, "session_key_expired", "sessionKey")


async def test_a_revoked_key_can_neither_open_nor_keep_a_session(
    http: aiohttp.ClientSession, tollgate_on_chain: RunningTollgate, accounts: SmartAccounts,
) -> None:
    owner, account, key = await account_with_key(accounts)
    by_key = await open_session(http, tollgate_on_chain, *key_signs(key, account))
    body = message(owner, smartAccount=account, sessionKey=key.address)
    by_owner = await open_session(http, tollgate_on_chain, body, sign(owner, body))

    await accounts.revoke(owner, account, key.address)
    # Every session that Tollgate would have collected for through this key ends.
    for issued in (by_key, by_owner):
        status, answer, headers = await get_account(http, tollgate_on_chain, issued["token"])
        assert_token_refused(status, answer, headers, "session_key_revoked")
    status, answer, _ = await post_authorization(http, tollgate_on_chain.url,
                                                 *key_signs(key, account))
    assert_error(status, answer, 403, "session_key_not_live", "sessionKey")

    # The owner re-grants the key: the session is good again.
    await accounts.grant(owner, account, key.address)
    status, answer, _ = await get_account(http, tollgate_on_chain, by_key["token"])
    assert status == 200, answer


async def test_a_warm_policy_cache_costs_no_chain_call(
    http: aiohttp.ClientSession, catalog: Catalog, postgres_url: str, redis_url: str,
    dev_chain: DevChain, accounts: SmartAccounts,
) -> None:
    async with proxied_tollgate(catalog, postgres_url, redis_url, dev_chain,
                                session_policy_cache_s=300) as (tollgate, proxy):
        owner, account, key = await account_with_key(accounts)
        issued = await open_session(http, tollgate, *key_signs(key, account))
        assert "eth_call" in proxy.methods
        calls = len(proxy.methods)
        for _ in range(3):
            status, answer, _ = await get_account(http, tollgate, issued["token"])
            assert status == 200, answer
        assert len(proxy.methods) == calls, proxy.methods[calls:]
        # The price of that: a revocation is seen within session_policy_cache_s, not at once.
        await accounts.revoke(owner, account, key.address)
        status, answer, _ = await get_account(http, tollgate, issued["token"])
        assert status == 200, answer


async def test_with_the_chain_down_authorize_is_503_and_live_sessions_are_kept(
    http: aiohttp.ClientSession, catalog: Catalog, postgres_url: str, redis_url: str,
    dev_chain: DevChain, accounts: SmartAccounts,
) -> None:
    async with proxied_tollgate(catalog, postgres_url, redis_url, dev_chain,
                                session_policy_cache_s=0) as (tollgate, proxy):
        owner, account, key = await account_with_key(accounts)
        issued = await open_session(http, tollgate, *key_signs(key, account))
        await proxy.stop()

        body = message(owner, smartAccount=account, sessionKey=key.address)
        status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                     sign(owner, body))
        error = assert_error(status, answer, 503, "chain_unavailable")
        assert error["type"] == "service_unavailable"
        # Judged by the policy read at authorize, for a bounded time (STALE_GRACE_S).
        status, answer, _ = await get_account(http, tollgate, issued["token"])
        assert status == 200, answer


# -- startup -----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{"chain_id": 1}, {"rpc_url": "http://127.0.0.1:9"}],
                         ids=["wrong chain id", "unreachable node"])
async def test_a_chain_that_cannot_be_used_is_a_startup_error(
    catalog: Catalog, postgres_url: str, redis_url: str, dev_chain: DevChain,
    overrides: dict[str, Any],
) -> None:
    settings = chain_settings()
    app = create_app(settings, catalog,
                     Backends(postgres_url, redis_url, chain=dev_chain.config(**overrides)))
    runner = app_runner(app, settings)
    with pytest.raises(ChainUnavailableAtStart) as error:
        await runner.setup()
    await runner.cleanup()
    assert "cannot use its RPC node at start" in str(error.value)
    assert "127.0.0.1:9" not in str(error.value) or "rpc_url" in overrides
