"""The dev chain: deployed once per state dir, redeployed when its state is lost, found by
``tollgate dev-wallet`` only while in use. Real anvil processes throughout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from app.chain.client import ChainClient
from app.chain.errors import ChainIdMismatch
from app.devstack.anvil import DEV_CHAIN_ID, Anvil
from app.devstack.dev_chain import (
    CHAIN_DIR,
    DEPLOYMENT_FILE,
    RPC_URL_FILE,
    DevChain,
    ensure_dev_chain,
    find_dev_chain,
)


async def has_code(chain: DevChain) -> bool:
    client = await ChainClient.connect(chain.rpc_url, DEV_CHAIN_ID)
    try:
        deployment = chain.deployment
        codes = [await client.code_at(address)
                 for address in (deployment.token, deployment.factory, deployment.settlement)]
    finally:
        await client.close()
    return all(codes)


async def stop(chain: DevChain) -> None:
    await asyncio.to_thread(chain.stop)


async def test_contracts_are_deployed_once_per_state_dir(tmp_path: Path) -> None:
    chain_dir = tmp_path / CHAIN_DIR
    first = await ensure_dev_chain(tmp_path)
    try:
        assert first.started_anvil and first.deployed_now
        assert await has_code(first)
        assert (chain_dir / RPC_URL_FILE).read_text().strip() == first.rpc_url
        written = json.loads((chain_dir / DEPLOYMENT_FILE).read_text())
        assert written == first.deployment.to_json()
        found = find_dev_chain(tmp_path)
        assert found is not None and found.deployment == first.deployment
        config = first.config
        assert (config.chain_id, config.token, config.settlement, config.account_factories) == (
            DEV_CHAIN_ID, first.deployment.token, first.deployment.settlement,
            (first.deployment.factory,))
        assert config.confirmations == 1
    finally:
        await stop(first)
    assert not (chain_dir / RPC_URL_FILE).exists(), "no dev-wallet may find a stopped chain"
    assert find_dev_chain(tmp_path) is None

    second = await ensure_dev_chain(tmp_path)
    try:
        assert not second.deployed_now, "the chain state was kept: nothing to deploy"
        assert second.deployment == first.deployment
        assert await has_code(second)
    finally:
        await stop(second)


async def test_a_lost_chain_state_is_redeployed(tmp_path: Path) -> None:
    first = await ensure_dev_chain(tmp_path)
    await stop(first)
    (tmp_path / CHAIN_DIR / "anvil-state.json").unlink()

    again = await ensure_dev_chain(tmp_path)
    try:
        assert again.deployed_now, "deployment.json named contracts the chain no longer has"
        assert await has_code(again)
        written = json.loads((tmp_path / CHAIN_DIR / DEPLOYMENT_FILE).read_text())
        assert written == again.deployment.to_json()
    finally:
        await stop(again)


async def test_an_external_dev_node_is_deployed_to_and_left_running(tmp_path: Path) -> None:
    node = Anvil(None)
    url = await asyncio.to_thread(node.start)
    try:
        chain = await ensure_dev_chain(tmp_path, rpc_url=url)
        assert not chain.started_anvil and chain.deployed_now
        assert chain.rpc_url == url and await has_code(chain)
        assert (tmp_path / CHAIN_DIR / RPC_URL_FILE).read_text().strip() == url
        await stop(chain)
        assert not (tmp_path / CHAIN_DIR / RPC_URL_FILE).exists()
        client = await ChainClient.connect(url, DEV_CHAIN_ID)
        try:
            await client.block_number()  # still answering: not ours to stop
        finally:
            await client.close()
        reused = await ensure_dev_chain(tmp_path, rpc_url=url)
        assert not reused.deployed_now
        await stop(reused)
    finally:
        await asyncio.to_thread(node.stop)


async def test_a_node_on_another_chain_is_refused(tmp_path: Path) -> None:
    node = Anvil(None, chain_id=8453)
    url = await asyncio.to_thread(node.start)
    try:
        with pytest.raises(ChainIdMismatch):
            await ensure_dev_chain(tmp_path, rpc_url=url)
        assert find_dev_chain(tmp_path) is None
    finally:
        await asyncio.to_thread(node.stop)
