"""The smart-account verifier of /v1/authorize, against contracts on an in-process EVM."""

from __future__ import annotations

import itertools
import secrets
import time

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from app.errors import ApiError, AuthenticationFailed, PermissionDenied
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
    return bytes(signer.unsafe_sign_hash(authorization_digest(message)).signature)


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
    await verifier(env).verify(message, sign(env.owner, message))


async def test_the_session_key_itself_may_sign(env: ChainEnv) -> None:
    key = Account.create()
    account = deployed_account(env, session_key=key.address)
    message = authorization(env, key.address, account, key.address)
    await verifier(env).verify(message, sign(key, message))


async def test_an_eoa_paying_for_itself(env: ChainEnv) -> None:
    wallet = Account.create()
    message = authorization(env, wallet.address, wallet.address, Account.create().address)
    await verifier(env).verify(message, sign(wallet, message))


async def test_an_undeployed_account_signs_with_erc6492(env: ChainEnv) -> None:
    salt = next(_salts)
    account = env.factory.functions.getAddress(env.owner.address, salt).call()
    message = authorization(env, account, account, Account.create().address)
    inner = sign_1271(env.chain, env.owner, account, authorization_digest(message))
    await verifier(env).verify(message, wrap_6492(env.factory, env.owner, salt, inner))


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
