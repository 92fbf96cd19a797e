"""OperatorWallet: concurrent sends without nonce clashes, reverts named, the key never shown."""

from __future__ import annotations

import asyncio

import pytest
from web3.types import Wei

from app.chain.contracts import bind_contract
from app.chain.errors import TransactionReverted
from app.chain.operator import OperatorWallet
from tests.chain.conftest import ChainEnv
from tests.contracts.conftest import actor


def wallet(env: ChainEnv) -> OperatorWallet:
    return OperatorWallet(env.client, env.operator)


async def test_five_concurrent_transactions_get_distinct_nonces(env: ChainEnv) -> None:
    operator = wallet(env)
    usdc = bind_contract(env.client.w3, "TestUSDC", env.usdc.address)
    payee = actor("chain-payee").address
    before = env.usdc.functions.balanceOf(payee).call()
    hashes = await asyncio.gather(
        *(operator.transact(usdc.functions.mint(payee, 10 + i)) for i in range(5))
    )
    receipts = await asyncio.gather(
        *(env.client.wait_for_receipt(h, timeout_s=5.0) for h in hashes)
    )
    assert all(r["status"] == 1 for r in receipts)
    nonces = [env.chain.w3.eth.get_transaction(h)["nonce"] for h in hashes]
    assert len(set(nonces)) == 5 and max(nonces) - min(nonces) == 4
    assert env.usdc.functions.balanceOf(payee).call() == before + sum(10 + i for i in range(5))


async def test_nonce_resyncs_after_another_sender_used_it(env: ChainEnv) -> None:
    operator = wallet(env)
    usdc = bind_contract(env.client.w3, "TestUSDC", env.usdc.address)
    payee = actor("chain-payee").address
    await env.client.wait_for_receipt(await operator.transact(usdc.functions.mint(payee, 1)))
    # The same key sends from elsewhere (another process): the wallet's local nonce is stale.
    env.chain.w3.eth.send_transaction({"from": env.operator.address, "to": payee, "value": Wei(1)})
    receipt = await env.client.wait_for_receipt(
        await operator.transact(usdc.functions.mint(payee, 1)), timeout_s=5.0
    )
    assert receipt["status"] == 1


async def test_estimation_revert_names_the_custom_error(env: ChainEnv) -> None:
    operator = wallet(env)
    # Only the USDC owner may mint; the deployer's key is not the owner.
    usdc = bind_contract(env.client.w3, "TestUSDC", env.usdc.address)
    not_owner = OperatorWallet(env.client, env.deployer)
    with pytest.raises(TransactionReverted) as info:
        await not_owner.transact(usdc.functions.mint(env.deployer.address, 1))
    assert info.value.error_name == "NotOwner"
    # Nothing was sent, so no nonce was consumed: the next transaction still goes through.
    tx_hash = await operator.transact(usdc.functions.mint(env.deployer.address, 1))
    assert (await env.client.wait_for_receipt(tx_hash))["status"] == 1


async def test_mined_revert_raises_with_the_custom_error(env: ChainEnv) -> None:
    operator = wallet(env)
    usdc = bind_contract(env.client.w3, "TestUSDC", env.usdc.address)
    # A fixed gas limit skips estimation, so the transaction is mined and reverts on chain.
    call = usdc.functions.transferFrom(env.owner.address, env.operator.address, 1)
    tx_hash = await operator.transact(call, gas=200_000)
    with pytest.raises(TransactionReverted) as info:
        await env.client.wait_for_receipt(tx_hash, timeout_s=5.0)
    assert info.value.error_name == "InsufficientAllowance"
    assert info.value.tx_hash == tx_hash.to_0x_hex()


def test_repr_hides_the_key(env: ChainEnv) -> None:
    operator = wallet(env)
    shown = repr(operator) + str(operator)
    assert env.operator.address in shown
    assert env.operator.key.hex() not in shown
