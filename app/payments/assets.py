"""The asset Tollgate is paid in, per chain: USDC (or TestUSDC on a dev chain).

x402 names a chain by its CAIP-2 id (``eip155:<chainId>``) and an EIP-3009 token by its
address plus its EIP-712 domain (name, version), which payers need to sign.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_utils import to_checksum_address

from app.chain.client import ChainClient
from app.chain.contracts import bind_contract


@dataclass(frozen=True, slots=True)
class PaymentAsset:
    chain_id: int
    address: str  # checksummed
    name: str  # EIP-712 domain name
    version: str  # EIP-712 domain version
    decimals: int = 6

    def __post_init__(self) -> None:
        # Ledger amounts are micro-USD; they equal the token's base units only at 6 decimals.
        assert self.decimals == 6, "the ledger's micro-USD are USDC base units"

    @property
    def network(self) -> str:
        return caip2(self.chain_id)


def caip2(chain_id: int) -> str:
    return f"eip155:{chain_id}"


# Circle's USDC: the EIP-712 domains are the ones the contracts report on chain.
KNOWN_USDC: dict[int, PaymentAsset] = {
    8453: PaymentAsset(8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin", "2"),
    84532: PaymentAsset(84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2"),
}


async def read_payment_asset(client: ChainClient, token: str) -> PaymentAsset:
    """The token's EIP-712 domain as the chain reports it (what signatures must match)."""
    contract = bind_contract(client.w3, "TestUSDC", token)
    name = await client.read(contract.functions.name())
    version = await client.read(contract.functions.version())
    decimals = await client.read(contract.functions.decimals())
    return PaymentAsset(client.chain_id, to_checksum_address(token), str(name), str(version),
                        int(decimals))
