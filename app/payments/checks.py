"""Whether a readable payment proof is acceptable: every refusal is a 402 with its reason.

The proof is compared with what Tollgate asks for now (asset, network, payTo, amount),
never with the copy of a requirement the client sends back.
"""

from __future__ import annotations

from dataclasses import dataclass

from x402.mechanisms.evm.eip712 import hash_eip3009_authorization
from x402.mechanisms.evm.types import ExactEIP3009Authorization

from app.errors import PaymentRequired
from app.payments.assets import PaymentAsset
from app.payments.proof import PaymentProof
from app.payments.requirements import SCHEME

# A proof must stay valid this long after we accept it, so the settlement can be mined.
VALID_BEFORE_MARGIN_S = 60
# Clocks differ: a validAfter this far ahead of ours is still accepted.
VALID_AFTER_SKEW_S = 5


@dataclass(frozen=True, slots=True)
class Asked:
    """What Tollgate asks for at this moment."""

    asset: PaymentAsset
    pay_to: str
    min_amount_micros: int


def check_proof(proof: PaymentProof, asked: Asked, now_s: int) -> None:
    """Raise a 402 naming the first mismatch; return when the proof's terms are ours."""
    asset = asked.asset
    if proof.scheme != SCHEME:
        raise _refused(f"scheme must be '{SCHEME}'", "payment_wrong_scheme")
    if proof.network != asset.network:
        raise _refused(f"network must be {asset.network}", "payment_wrong_network")
    accepted = proof.accepted
    if accepted is not None:
        if accepted.asset.lower() != asset.address.lower():
            raise _refused(f"asset must be {asset.address}", "payment_wrong_asset")
        if accepted.pay_to.lower() != asked.pay_to.lower():
            raise _refused(f"payTo must be {asked.pay_to}", "payment_wrong_pay_to")
    if proof.to != asked.pay_to.lower():
        raise _refused(f"the authorization must pay {asked.pay_to}", "payment_wrong_pay_to")
    if proof.value < asked.min_amount_micros:
        raise _refused(
            f"the authorization pays {proof.value}; at least {asked.min_amount_micros}"
            f" ({asset.decimals}-decimal units of {asset.address}) is needed",
            "payment_amount_too_low",
        )
    if proof.valid_before < now_s + VALID_BEFORE_MARGIN_S:
        raise _refused(
            f"validBefore must be at least {VALID_BEFORE_MARGIN_S} s in the future",
            "payment_expired",
        )
    if proof.valid_after > now_s + VALID_AFTER_SKEW_S:
        raise _refused("validAfter is in the future", "payment_not_yet_valid")


def authorization_digest(proof: PaymentProof, asset: PaymentAsset) -> bytes:
    """The EIP-712 digest of the payer's TransferWithAuthorization in the token's domain."""
    authorization = ExactEIP3009Authorization(
        from_address=proof.payer, to=proof.to, value=str(proof.value),
        valid_after=str(proof.valid_after), valid_before=str(proof.valid_before),
        nonce="0x" + proof.nonce.hex(),
    )
    return hash_eip3009_authorization(authorization, asset.chain_id, asset.address,
                                      asset.name, asset.version)


def _refused(message: str, code: str) -> PaymentRequired:
    return PaymentRequired(f"payment refused: {message}", code=code)
