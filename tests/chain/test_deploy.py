"""The dev-chain deployment: every contract has code and is wired to the others."""

from __future__ import annotations

from app.chain.contracts import bind_contract
from tests.conftest import DevChain


async def test_deployed_set_is_wired_together(dev_chain: DevChain) -> None:
    deployment, client = dev_chain.deployment, dev_chain.client
    for address in (deployment.token, deployment.factory, deployment.settlement):
        assert await client.code_at(address), f"no code at {address}"
    usdc = bind_contract(client.w3, "TestUSDC", deployment.token)
    assert await client.read(usdc.functions.decimals()) == 6
    factory = bind_contract(client.w3, "TollgateAccountFactory", deployment.factory)
    assert await client.read(factory.functions.entryPoint()) == deployment.entry_point
    settlement = bind_contract(client.w3, "TollgateSettlement", deployment.settlement)
    assert await client.read(settlement.functions.token()) == deployment.token
