"""Turning an accepted payment proof into money on chain: directly through Tollgate's
settlement contract with the operator key, or through an x402 facilitator.

Both answer with a transaction hash; confirmation (N blocks deep) is the caller's
wait. A settlement that reverts is classified: the authorization was already used by
someone who submitted it to the token directly (front-running: the funds still reached
the settlement contract, because ``to`` is signed) or it failed for a reason the payer
must hear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from x402.schemas import PaymentRequirements

from app.chain.client import ChainClient
from app.chain.contracts import bind_contract
from app.chain.errors import ChainError, TransactionReverted
from app.chain.operator import OperatorWallet
from app.payments.assets import PaymentAsset
from app.payments.proof import PaymentProof


def payment_reference(proof: PaymentProof, asset: PaymentAsset) -> str:
    """The bytes32 that names this payment on chain and in the ledger: one per authorization,
    so a retried settlement of the same proof can never be a second payment."""
    material = b"tollgate:x402:" + asset.chain_id.to_bytes(32, "big") + \
        bytes.fromhex(asset.address[2:]) + bytes.fromhex(proof.payer[2:]) + proof.nonce
    return "0x" + keccak(material).hex()


class SettlementRefused(Exception):
    """The payment cannot be settled (bad signature on chain, insufficient funds...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AlreadyUsed(Exception):
    """The authorization's nonce was used on chain by someone else's submission."""


class Settler(Protocol):
    method: str

    async def settle(self, proof: PaymentProof, requirement: PaymentRequirements,
                     reference: str) -> str:
        """Submit the payment; return the transaction hash (not yet confirmed)."""


@dataclass
class OnchainSettler:
    """The operator submits ``settleWithTransferAuthorization`` to the settlement contract."""

    client: ChainClient
    operator: OperatorWallet
    settlement: str
    asset: PaymentAsset
    method: str = "onchain"

    async def settle(self, proof: PaymentProof, requirement: PaymentRequirements,
                     reference: str) -> str:
        contract = bind_contract(self.client.w3, "TollgateSettlement", self.settlement)
        call = contract.functions.settleWithTransferAuthorization(
            to_checksum_address(proof.payer), proof.value, proof.valid_after, proof.valid_before,
            proof.nonce, proof.signature, HexBytes(reference),
        )
        try:
            tx_hash = await self.operator.transact(call)
        except TransactionReverted as reverted:
            # Gas estimation simulates the call: a revert here sent nothing.
            if await self.authorization_used(proof):
                raise AlreadyUsed() from None
            raise SettlementRefused(reverted.error_name or "the settlement reverted") from None
        return "0x" + bytes(tx_hash).hex()

    async def authorization_used(self, proof: PaymentProof) -> bool:
        token = bind_contract(self.client.w3, "TestUSDC", self.asset.address)
        used = await self.client.read(token.functions.authorizationState(
            to_checksum_address(proof.payer), proof.nonce))
        return bool(used)


@dataclass
class FacilitatorSettler:
    """An x402 facilitator verifies and settles (``POST /verify``, ``POST /settle``)."""

    session: aiohttp.ClientSession
    url: str
    timeout_s: float
    method: str = "facilitator"

    async def settle(self, proof: PaymentProof, requirement: PaymentRequirements,
                     reference: str) -> str:
        body = {
            "x402Version": 2,
            "paymentPayload": _payload_document(proof, requirement),
            "paymentRequirements": requirement.model_dump(by_alias=True, mode="json"),
        }
        verified = await self._post("/verify", body)
        if not verified.get("isValid"):
            raise SettlementRefused(str(verified.get("invalidReason") or "refused by facilitator"))
        settled = await self._post("/settle", body)
        transaction = settled.get("transaction")
        if not settled.get("success") or not isinstance(transaction, str) or not transaction:
            raise SettlementRefused(str(settled.get("errorReason") or "facilitator settle failed"))
        return transaction

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self.session.post(
                self.url.rstrip("/") + path, json=body,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as response:
                if response.status >= 500:
                    raise FacilitatorUnavailable(f"facilitator {path} answered {response.status}")
                document = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise FacilitatorUnavailable(f"facilitator {path}: {type(error).__name__}") from None
        if not isinstance(document, dict):
            raise FacilitatorUnavailable(f"facilitator {path} answered something unreadable")
        return document


class FacilitatorUnavailable(ChainError):
    """The facilitator could not be reached, timed out or failed (5xx)."""


def _payload_document(proof: PaymentProof, requirement: PaymentRequirements) -> dict[str, Any]:
    return {
        "x402Version": 2,
        "accepted": requirement.model_dump(by_alias=True, mode="json"),
        "payload": {
            "signature": "0x" + proof.signature.hex(),
            "authorization": {
                "from": to_checksum_address(proof.payer), "to": to_checksum_address(proof.to),
                "value": str(proof.value), "validAfter": str(proof.valid_after),
                "validBefore": str(proof.valid_before), "nonce": "0x" + proof.nonce.hex(),
            },
        },
    }
