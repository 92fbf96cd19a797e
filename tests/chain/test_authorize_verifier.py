"""The smart-account verifier of /v1/authorize, against contracts on an in-process EVM."""

from __future__ import annotations

import itertools
import secrets
import time

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import Hash32
from web3 import AsyncHTTPProvider, AsyncWeb3, Web3

from app.chain.client import ChainClient
from app.errors import ApiError, AuthenticationFailed, PermissionDenied, ServiceUnavailable
from app.identity.authorization import Authorization
from app.identity.chain_verifier import ChainVerifier, authorization_digest
from tests.chain.conftest import ChainEnv
from tests.chain.test_signatures import wrap_6492
from tests.contracts.conftest import actor, policy, sign_1271

SETTLEMENT = Web3.to_checksum_address("0x" + "5e" * 20)
ELSEWHERE = Web3.to_checksum_address("0x" + "ab" * 20)
_salts = itertools.count(70_000)


def verifier(env: ChainEnv) -> ChainVerifier:
    return ChainVerifier(env.client, settlement=SETTLEMENT, token=env.usdc.address,
                         factory_allowlist={env.factory.address})


def authorization(env: ChainEnv, wallet: str, account: str, session_key: str) -> Authorization:
    now_s = int(time.time())
    return Authorization(
        wallet=wallet.lower(), smart_account=account.lower(), session_key=session_key.lower(),
        chain_id=env.chain.chain_id, nonce=secrets.token_hex(8), issued_at_s=now_s,
        expires_at_s=now_s + 3600,
    )


def sign(signer: LocalAccount, message: Authorization) -> bytes:
    return bytes(signer.unsafe_sign_hash(Hash32(authorization_digest(message))).signature)


def deployed_account(env: ChainEnv, *, session_key: str | None = None,
                     payee: str = SETTLEMENT) -> str:
    salt = next(_salts)
    address: str = env.factory.functions.getAddress(env.owner.address, salt).call()
    env.chain.send(env.factory.functions.createAccount(env.owner.address, salt), env.deployer)
    if session_key is not None:
        grant = env.chain.contract("TollgateAccount", address).functions.grantSessionKey(
            session_key, policy(env.usdc.address, payee, 10**9, 86_400, env.chain.now() + 86_400)
        )
        env.chain.send(grant, env.owner)
    return address


async def refused(env: ChainEnv, message: Authorization, signature: bytes) -> ApiError:
    with pytest.raises(ApiError) as error:
        await verifier(env).verify(message, signature)
    return error.value


async def test_owner_with_a_live_session_key(env: ChainEnv) -> None:
    key = Account.create()
    account = deployed_account(env, session_key=key.address)
    message = authorization(env, env.owner.address, account, key.address)
    policy = await verifier(env).verify(message, sign(env.owner, message))
    # The session depends on this policy: it pays the settlement contract until validUntil.
    assert policy is not None and policy.live
    assert policy.payee == SETTLEMENT.lower() and policy.token == env.usdc.address.lower()
    assert policy.valid_until_s > env.chain.now()


async def test_the_session_key_itself_may_sign(env: ChainEnv) -> None:
    key = Account.create()
    account = deployed_account(env, session_key=key.address)
    message = authorization(env, key.address, account, key.address)
    assert await verifier(env).verify(message, sign(key, message)) is not None


async def test_an_eoa_paying_for_itself(env: ChainEnv) -> None:
    wallet = Account.create()
    message = authorization(env, wallet.address, wallet.address, Account.create().address)
    assert await verifier(env).verify(message, sign(wallet, message)) is None


async def test_an_undeployed_account_signs_with_erc6492(env: ChainEnv) -> None:
    salt = next(_salts)
    account = env.factory.functions.getAddress(env.owner.address, salt).call()
    message = authorization(env, account, account, Account.create().address)
    inner = sign_1271(env.chain, env.owner, account, authorization_digest(message))
    # Not deployed: no session keys yet, so the session depends on no policy.
    assert await verifier(env).verify(
        message, wrap_6492(env.factory, env.owner, salt, inner)) is None


async def test_refusals(env: ChainEnv) -> None:
    key = Account.create()
    account = deployed_account(env, session_key=key.address)
    mallory = actor("verifier-mallory")

    message = authorization(env, env.owner.address, account, key.address)
    error = await refused(env, message, sign(mallory, message))
    assert isinstance(error, AuthenticationFailed) and error.code == "signature_mismatch"

    message = authorization(env, mallory.address, account, key.address)
    error = await refused(env, message, sign(mallory, message))
    assert isinstance(error, PermissionDenied) and error.code == "smart_account_not_owned"

    never_granted = Account.create()
    message = authorization(env, env.owner.address, account, never_granted.address)
    error = await refused(env, message, sign(env.owner, message))
    assert error.code == "session_key_not_live"

    other_payee = Account.create()
    elsewhere = deployed_account(env, session_key=other_payee.address, payee=ELSEWHERE)
    message = authorization(env, env.owner.address, elsewhere, other_payee.address)
    error = await refused(env, message, sign(env.owner, message))
    assert error.code == "session_key_wrong_payee"

    undeployed = env.factory.functions.getAddress(env.owner.address, next(_salts)).call()
    message = authorization(env, env.owner.address, undeployed, key.address)
    error = await refused(env, message, sign(env.owner, message))
    assert error.code == "smart_account_not_deployed"


async def test_a_revoked_session_key_cannot_open_a_session(env: ChainEnv) -> None:
    key = Account.create()
    account = deployed_account(env, session_key=key.address)
    revoke = env.chain.contract("TollgateAccount", account).functions.revokeSessionKey(
        key.address)
    env.chain.send(revoke, env.owner)
    message = authorization(env, env.owner.address, account, key.address)
    assert (await refused(env, message, sign(env.owner, message))).code == "session_key_not_live"


async def test_an_expired_session_key_cannot_open_a_session(env: ChainEnv) -> None:
    key = Account.create()
    account = deployed_account(env, session_key=key.address)
    env.chain.advance(86_400)
    message = authorization(env, key.address, account, key.address)
    error = await refused(env, message, sign(key, message))
    assert isinstance(error, PermissionDenied) and error.code == "session_key_expired"


async def test_a_foreign_contract_can_only_sign_for_itself(env: ChainEnv) -> None:
    """Nobody's key may claim a contract that is not a Tollgate account (here the token)."""
    key = actor("verifier-claims-usdc")
    message = authorization(env, key.address, env.usdc.address, key.address)
    error = await refused(env, message, sign(key, message))
    assert isinstance(error, PermissionDenied) and error.code == "smart_account_not_supported"


async def test_an_unreachable_node_is_503_never_a_pass(env: ChainEnv) -> None:
    # Nothing listens on the discard port: every call fails to connect.
    down = ChainClient(AsyncWeb3(AsyncHTTPProvider("http://127.0.0.1:9")), env.chain.chain_id,
                       call_timeout_s=2.0)
    unreachable = ChainVerifier(down, settlement=SETTLEMENT, token=env.usdc.address,
                                factory_allowlist={env.factory.address})
    key = Account.create()
    account = deployed_account(env, session_key=key.address)
    message = authorization(env, env.owner.address, account, key.address)
    with pytest.raises(ServiceUnavailable) as error:
        await unreachable.verify(message, sign(env.owner, message))
    assert error.value.code == "chain_unavailable"
    await down.close()
