"""verify_signature: EOAs, deployed accounts (ERC-1271), undeployed accounts (ERC-6492)."""

from __future__ import annotations

import secrets

from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from web3.contract import Contract

from app.chain.signatures import ERC6492_SUFFIX, SECP256K1_N, verify_signature
from tests.chain.conftest import ChainEnv
from tests.contracts.conftest import actor, sign_1271, sign_raw


def wrap_6492(factory: Contract, owner: LocalAccount, salt: int, inner: bytes) -> bytes:
    calldata = factory.functions.createAccount(owner.address, salt)._encode_transaction_data()
    encoded = abi_encode(
        ["address", "bytes", "bytes"], [factory.address, bytes.fromhex(calldata[2:]), inner]
    )
    return encoded + ERC6492_SUFFIX


def allow(env: ChainEnv) -> set[str]:
    return {env.factory.address}


async def test_eoa_signature_valid_and_wrong_signer_refused(env: ChainEnv) -> None:
    digest = secrets.token_bytes(32)
    signature = sign_raw(env.owner, digest)
    assert await verify_signature(
        env.client, env.owner.address, digest, signature, factory_allowlist=set()
    )
    assert not await verify_signature(
        env.client, actor("someone-else").address, digest, signature, factory_allowlist=set()
    )
    other_digest = secrets.token_bytes(32)
    assert not await verify_signature(
        env.client, env.owner.address, other_digest, signature, factory_allowlist=set()
    )


async def test_eoa_v_as_0_or_1_accepted_and_high_s_refused(env: ChainEnv) -> None:
    digest = secrets.token_bytes(32)
    signature = sign_raw(env.owner, digest)
    r, s, v = signature[:32], int.from_bytes(signature[32:64]), signature[64]
    zero_based = r + s.to_bytes(32) + bytes([v - 27])
    assert await verify_signature(
        env.client, env.owner.address, digest, zero_based, factory_allowlist=set()
    )
    # (r, n - s) with the other parity recovers the same key: the malleable twin is refused.
    high_s = r + (SECP256K1_N - s).to_bytes(32) + bytes([55 - v])
    assert not await verify_signature(
        env.client, env.owner.address, digest, high_s, factory_allowlist=set()
    )
    assert not await verify_signature(
        env.client, env.owner.address, digest, signature[:64], factory_allowlist=set()
    )


async def test_erc1271_deployed_account(env: ChainEnv) -> None:
    salt = 1271
    address = env.factory.functions.getAddress(env.owner.address, salt).call()
    env.chain.send(env.factory.functions.createAccount(env.owner.address, salt), env.deployer)
    digest = secrets.token_bytes(32)
    wrapped = sign_1271(env.chain, env.owner, address, digest)
    assert await verify_signature(env.client, address, digest, wrapped, factory_allowlist=set())
    # A raw signature over the hash would be replayable on the owner's other accounts.
    raw = sign_raw(env.owner, digest)
    assert not await verify_signature(env.client, address, digest, raw, factory_allowlist=set())
    # A contract without isValidSignature is refused, not an error.
    assert not await verify_signature(
        env.client, env.usdc.address, digest, wrapped, factory_allowlist=set()
    )


async def test_erc6492_undeployed_account_from_allowlisted_factory(env: ChainEnv) -> None:
    salt = 6492
    address = env.factory.functions.getAddress(env.owner.address, salt).call()
    assert env.chain.w3.eth.get_code(address) == b""
    digest = secrets.token_bytes(32)
    inner = sign_1271(env.chain, env.owner, address, digest)
    signature = wrap_6492(env.factory, env.owner, salt, inner)
    assert await verify_signature(
        env.client, address, digest, signature, factory_allowlist=allow(env)
    )
    # Verification sent nothing: the account is still undeployed.
    assert env.chain.w3.eth.get_code(address) == b""
    # The wrong digest, an unwrapped inner signature, or another owner's key are refused.
    assert not await verify_signature(
        env.client, address, secrets.token_bytes(32), signature, factory_allowlist=allow(env)
    )
    raw = wrap_6492(env.factory, env.owner, salt, sign_raw(env.owner, digest))
    assert not await verify_signature(
        env.client, address, digest, raw, factory_allowlist=allow(env)
    )
    mallory = actor("chain-mallory")
    forged = wrap_6492(env.factory, env.owner, salt, sign_1271(env.chain, mallory, address, digest))
    assert not await verify_signature(
        env.client, address, digest, forged, factory_allowlist=allow(env)
    )
    # Calldata for another salt deploys another address than the signer.
    other_salt = wrap_6492(env.factory, env.owner, salt + 1, inner)
    assert not await verify_signature(
        env.client, address, digest, other_salt, factory_allowlist=allow(env)
    )
    # Once deployed, the same wrapped signature is checked through ERC-1271.
    env.chain.send(env.factory.functions.createAccount(env.owner.address, salt), env.deployer)
    assert await verify_signature(
        env.client, address, digest, signature, factory_allowlist=allow(env)
    )


async def test_erc6492_from_factory_not_allowlisted_refused(env: ChainEnv) -> None:
    salt = 6493
    address = env.other_factory.functions.getAddress(env.owner.address, salt).call()
    digest = secrets.token_bytes(32)
    inner = sign_1271(env.chain, env.owner, address, digest)
    signature = wrap_6492(env.other_factory, env.owner, salt, inner)
    assert not await verify_signature(
        env.client, address, digest, signature, factory_allowlist=allow(env)
    )
    # The same signature passes once that factory is allowed: the refusal was the allowlist.
    assert await verify_signature(
        env.client, address, digest, signature, factory_allowlist={env.other_factory.address}
    )
    assert not await verify_signature(
        env.client, address, digest, b"\x00" * 40 + ERC6492_SUFFIX, factory_allowlist=allow(env)
    )
