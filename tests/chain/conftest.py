"""An in-process EVM shared by a sync ``Web3`` (to deploy and arrange state with the contract
test helpers) and the async client under test, both on one ``EthereumTester``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3, EthereumTesterProvider, Web3
from web3.contract import Contract
from web3.providers.eth_tester import AsyncEthereumTesterProvider

from app.chain.client import ChainClient
from tests.contracts.conftest import Chain, actor

# Short polls keep receipt waits fast on a chain that mines on every transaction.
POLL_INTERVAL_S = 0.01


@dataclass
class ChainEnv:
    chain: Chain  # sync side: deploys and arranges state
    client: ChainClient  # async side: the code under test
    deployer: LocalAccount
    operator: LocalAccount  # owns the TestUSDC, so its mints succeed
    entry_point: LocalAccount
    owner: LocalAccount  # owner of smart accounts
    usdc: Contract
    factory: Contract  # allowlisted
    other_factory: Contract  # same code, not allowlisted


@pytest.fixture(scope="session")
def env() -> ChainEnv:
    provider = AsyncEthereumTesterProvider()
    chain = Chain(
        w3=Web3(EthereumTesterProvider(provider.ethereum_tester)), tester=provider.ethereum_tester
    )
    deployer, operator = actor("chain-deployer"), actor("chain-operator")
    entry_point, owner = actor("chain-entry-point"), actor("chain-owner")
    for who in (deployer, operator, entry_point, owner):
        chain.fund(who)
    client = ChainClient(
        AsyncWeb3(provider), chain.chain_id, call_timeout_s=5.0, poll_interval_s=POLL_INTERVAL_S
    )
    return ChainEnv(
        chain=chain,
        client=client,
        deployer=deployer,
        operator=operator,
        entry_point=entry_point,
        owner=owner,
        usdc=chain.deploy("TestUSDC", operator.address, sender=deployer),
        factory=chain.deploy("TollgateAccountFactory", entry_point.address, sender=deployer),
        other_factory=chain.deploy("TollgateAccountFactory", entry_point.address, sender=deployer),
    )
