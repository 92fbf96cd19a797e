"""ChainClient: chain id check, error translation, receipt waits with confirmations."""

from __future__ import annotations

import asyncio

import pytest
from web3.types import Wei

from app.chain.client import ChainClient
from app.chain.contracts import bind_contract
from app.chain.errors import (
    ChainIdMismatch,
    ConfirmationTimeout,
    RpcTimeout,
    RpcUnavailable,
    TransactionReverted,
)
from tests.chain.conftest import ChainEnv


async def test_chain_id_mismatch_is_a_typed_error(env: ChainEnv) -> None:
    wrong = ChainClient(env.client.w3, env.client.chain_id + 1)
    with pytest.raises(ChainIdMismatch) as info:
        await wrong.verify_chain_id()
    assert info.value.actual == env.client.chain_id
    await env.client.verify_chain_id()


async def test_rpc_down_is_unavailable() -> None:
    # Port 9 (discard) has no listener: the connection is refused at once.
    with pytest.raises(RpcUnavailable):
        await ChainClient.connect("http://127.0.0.1:9", 1, call_timeout_s=2.0)


async def test_slow_request_times_out(env: ChainEnv) -> None:
    impatient = ChainClient(env.client.w3, env.client.chain_id, call_timeout_s=0.05)
    with pytest.raises(RpcTimeout):
        await impatient.rpc(asyncio.sleep(1))


async def test_reads_and_code(env: ChainEnv) -> None:
    assert await env.client.block_number() > 0
    assert await env.client.code_at(env.usdc.address)
    assert await env.client.code_at(env.owner.address) == b""
    usdc = bind_contract(env.client.w3, "TestUSDC", env.usdc.address)
    assert await env.client.read(usdc.functions.symbol()) == "USDC"


async def test_reverted_call_names_the_custom_error(env: ChainEnv) -> None:
    usdc = bind_contract(env.client.w3, "TestUSDC", env.usdc.address)
    call = usdc.functions.transferFrom(env.owner.address, env.deployer.address, 1)
    with pytest.raises(TransactionReverted) as info:
        await env.client.rpc(call.call({"from": env.deployer.address}))
    assert info.value.error_name == "InsufficientAllowance"


async def test_wait_for_receipt_counts_confirmations(env: ChainEnv) -> None:
    tx_hash = env.chain.w3.eth.send_transaction(
        {"from": env.deployer.address, "to": env.owner.address, "value": Wei(1)}
    )
    waiting = asyncio.create_task(
        env.client.wait_for_receipt(tx_hash, confirmations=3, timeout_s=5.0)
    )
    await asyncio.sleep(0.05)
    assert not waiting.done(), "returned before 3 confirmations"
    env.chain.tester.mine_blocks(2)
    receipt = await waiting
    assert receipt["status"] == 1
    assert await env.client.block_number() - receipt["blockNumber"] + 1 >= 3


async def test_wait_for_receipt_times_out(env: ChainEnv) -> None:
    tx_hash = env.chain.w3.eth.send_transaction(
        {"from": env.deployer.address, "to": env.owner.address, "value": Wei(1)}
    )
    with pytest.raises(ConfirmationTimeout):
        await env.client.wait_for_receipt(tx_hash, confirmations=50, timeout_s=0.1)
