"""Deploying Tollgate's contracts from the committed artifacts (dev chains and tests).

Production uses real USDC and a settlement contract deployed by the operator's own
process; this module is what a dev chain and the tests use to get the same set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from eth_utils import to_checksum_address
from hexbytes import HexBytes

from app.chain.client import ChainClient
from app.chain.contracts import ContractName, load_artifacts
from app.chain.operator import OperatorWallet

# ERC-4337 v0.7's canonical EntryPoint address. The dev chain has no bundler, so no code
# lives there; accounts only need to know which address may call validateUserOp.
ENTRY_POINT_V07 = "0x0000000071727De22E5E9d8BAf0edAc6f37da032"


@dataclass(frozen=True)
class Deployment:
    """Checksummed addresses of one deployed set, as kept in a dev chain's state dir."""

    chain_id: int
    token: str
    factory: str
    settlement: str
    entry_point: str
    operator: str  # the settlement contract's operator (and the token's owner)
    treasury: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Deployment:
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


async def deploy_contract(client: ChainClient, deployer: OperatorWallet, name: ContractName,
                          *args: Any) -> str:
    """Deploy one artifact and return its checksummed address once mined."""
    artifacts = load_artifacts(name)
    constructor = client.w3.eth.contract(abi=artifacts.abi,
                                         bytecode=artifacts.bytecode).constructor(*args)
    data = HexBytes(constructor.data_in_transaction)
    tx_hash = await deployer.send(to=None, data=data)
    receipt = await client.wait_for_receipt(tx_hash)
    address = receipt.get("contractAddress")
    assert address, f"{name} deployment has no contract address"
    return to_checksum_address(address)


async def deploy_tollgate(client: ChainClient, operator: OperatorWallet, *, treasury: str,
                          entry_point: str = ENTRY_POINT_V07) -> Deployment:
    """TestUSDC (owned by the operator), an account factory and the settlement contract
    (admin and operator: the operator; sweeps go to ``treasury``)."""
    token = await deploy_contract(client, operator, "TestUSDC", operator.address)
    factory = await deploy_contract(client, operator, "TollgateAccountFactory", entry_point)
    settlement = await deploy_contract(client, operator, "TollgateSettlement", token,
                                       operator.address, operator.address, treasury)
    return Deployment(chain_id=client.chain_id, token=token, factory=factory,
                      settlement=settlement, entry_point=to_checksum_address(entry_point),
                      operator=operator.address, treasury=to_checksum_address(treasury))
