"""Wallet signatures: the header they arrive in, and 65-byte ECDSA (secp256k1) recovery.

Only low-s signatures are accepted (EIP-2): for every signature (r, s, v) the
pair (r, n - s, v ^ 1) is equally valid, so accepting both would let anyone
mint a second, different-looking signature for the same message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_keys.exceptions import BadSignature, ValidationError

from app.errors import AuthenticationFailed

SIGNATURE_HEADER = "X-Authorization-Signature"
ECDSA_SIGNATURE_BYTES = 65
# The header bound leaves room for contract-wallet signatures (ERC-1271, ERC-6492
# wrappers) that the chain verifier accepts; the ECDSA verifier wants exactly 65 bytes.
SIGNATURE_BYTES_MAX = 2048
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2
_HEX = re.compile(r"(?:0[xX])?((?:[0-9a-fA-F]{2})+)")


def signature_refused(message: str, code: str) -> AuthenticationFailed:
    return AuthenticationFailed(message, param=SIGNATURE_HEADER, code=code)


def signature_from_header(values: list[str]) -> bytes:
    """The signature bytes from the ``X-Authorization-Signature`` header(s)."""
    if not values:
        raise signature_refused(
            f"the {SIGNATURE_HEADER} header is missing: sign the Authorization message",
            "missing_signature",
        )
    if len(values) > 1:
        raise signature_refused(f"send one {SIGNATURE_HEADER} header", "malformed_signature")
    value = values[0].strip()
    match = _HEX.fullmatch(value) if len(value) <= 2 + 2 * SIGNATURE_BYTES_MAX else None
    if match is None:
        raise signature_refused(
            "the signature must be 0x-prefixed hex of the 65-byte r || s || v signature",
            "malformed_signature",
        )
    return bytes.fromhex(match.group(1))


@dataclass(frozen=True, slots=True)
class EcdsaSignature:
    """A canonical secp256k1 signature: 0 < r < n, 0 < s <= n/2, v in {27, 28}."""

    r: int
    s: int
    v: int

    def __post_init__(self) -> None:
        assert 0 < self.r < SECP256K1_N and 0 < self.s <= SECP256K1_HALF_N
        assert self.v in (27, 28)

    def to_bytes(self) -> bytes:
        return self.r.to_bytes(32, "big") + self.s.to_bytes(32, "big") + bytes([self.v])

    @classmethod
    def parse(cls, raw: bytes) -> EcdsaSignature:
        """Check length, ranges and low-s; ``v`` may be 27/28 or 0/1."""
        if len(raw) != ECDSA_SIGNATURE_BYTES:
            raise signature_refused(
                f"the signature must be {ECDSA_SIGNATURE_BYTES} bytes (r || s || v),"
                f" got {len(raw)}", "malformed_signature",
            )
        r = int.from_bytes(raw[:32], "big")
        s = int.from_bytes(raw[32:64], "big")
        v = raw[64]
        if v not in (0, 1, 27, 28):
            raise signature_refused("the signature's v must be 27, 28, 0 or 1",
                                    "malformed_signature")
        if not (0 < r < SECP256K1_N and 0 < s < SECP256K1_N):
            raise signature_refused("the signature's r or s is out of range",
                                    "invalid_signature")
        if s > SECP256K1_HALF_N:
            raise signature_refused(
                "high-s signature refused (EIP-2): use s' = n - s and flip v",
                "signature_not_low_s",
            )
        return cls(r, s, 27 + v % 27)


def recover_signer(typed: dict[str, object], signature: EcdsaSignature) -> str:
    """The lowercase address that signed the EIP-712 document (CPU-bound: ~10 ms)."""
    try:
        signer = Account.recover_message(
            encode_typed_data(full_message=typed), signature=signature.to_bytes()
        )
    except (BadSignature, ValidationError, ValueError):
        raise signature_refused("the signature does not recover to any key",
                                "invalid_signature") from None
    return str(signer).lower()
