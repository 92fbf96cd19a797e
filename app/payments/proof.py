"""Reading a payment proof from a request: ``PAYMENT-SIGNATURE`` (x402 v2) or ``X-PAYMENT`` (v1).

The x402 package decodes the header (base64 JSON) into its schemas; the scheme payload
inside (an EIP-3009 authorization and its signature) is checked here with strict
types, because the package's own container for it accepts anything. Whatever cannot
be read is a 400 that says why; whether a readable proof is acceptable is decided
elsewhere (``checks.py``), and refusals there are 402.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from x402.http.constants import PAYMENT_SIGNATURE_HEADER, X_PAYMENT_HEADER
from x402.http.utils import decode_payment_signature_header
from x402.schemas import PaymentPayload, PaymentRequirements
from x402.schemas.v1 import PaymentPayloadV1

from app.errors import InvalidRequest

# A proof is a few hundred bytes; anything far larger is not one (aiohttp already caps
# every header line, this names the reason).
PROOF_HEADER_BYTES_MAX = 8 * 1024

Address = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{40}$")]
Uint = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,78}$")]
Bytes32 = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{64}$")]
HexBytes = Annotated[str, StringConstraints(pattern=r"^0x(?:[0-9a-fA-F]{2}){1,4096}$")]


class _Authorization(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    from_: Address = Field(alias="from")
    to: Address
    value: Uint
    valid_after: Uint = Field(alias="validAfter")
    valid_before: Uint = Field(alias="validBefore")
    nonce: Bytes32


class _ExactPayload(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    signature: HexBytes
    authorization: _Authorization


@dataclass(frozen=True, slots=True)
class PaymentProof:
    """One EIP-3009 ``TransferWithAuthorization``, as the payer signed it."""

    x402_version: int
    header: str  # which header carried it
    scheme: str
    network: str
    # v2 proofs repeat the requirement they answer; it is compared with ours, never trusted.
    accepted: PaymentRequirements | None
    payer: str  # lowercase
    to: str  # lowercase
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes
    signature: bytes

    def __post_init__(self) -> None:
        assert len(self.nonce) == 32 and self.value >= 0


def read_payment_proof(headers: Mapping[str, str]) -> PaymentProof | None:
    """The request's payment proof, None without one, or a 400 ``InvalidRequest``."""
    name = PAYMENT_SIGNATURE_HEADER if PAYMENT_SIGNATURE_HEADER in headers else None
    if name is None and X_PAYMENT_HEADER in headers:
        name = X_PAYMENT_HEADER
    if name is None:
        return None
    raw = headers[name].strip()
    if len(raw) > PROOF_HEADER_BYTES_MAX:
        raise _bad(name, f"{name} is longer than {PROOF_HEADER_BYTES_MAX} bytes")
    if not raw:
        raise _bad(name, f"{name} is empty")
    try:
        decoded = decode_payment_signature_header(raw)
    except (binascii.Error, UnicodeDecodeError):
        raise _bad(name, f"{name} is not base64 of UTF-8 JSON") from None
    except json.JSONDecodeError:
        raise _bad(name, f"{name} does not decode to JSON") from None
    except ValidationError as error:
        raise _bad(name, f"{name} is not an x402 payment payload: {_first(error)}") from None
    except (AttributeError, TypeError):
        # JSON that is not an object (a list, a number) has no x402Version to read.
        raise _bad(name, f"{name} does not decode to a JSON object") from None
    try:
        exact = _ExactPayload.model_validate(decoded.payload)
    except ValidationError as error:
        raise _bad(name, f"{name} payload is not an EIP-3009 authorization: "
                         f"{_first(error)}") from None
    if isinstance(decoded, PaymentPayloadV1):
        version, scheme, network, accepted = 1, decoded.scheme, decoded.network, None
    else:
        assert isinstance(decoded, PaymentPayload)
        version, scheme, network = decoded.x402_version, decoded.accepted.scheme, \
            decoded.accepted.network
        accepted = decoded.accepted
    authorization = exact.authorization
    return PaymentProof(
        x402_version=version, header=name, scheme=scheme, network=network, accepted=accepted,
        payer=authorization.from_.lower(), to=authorization.to.lower(),
        value=int(authorization.value), valid_after=int(authorization.valid_after),
        valid_before=int(authorization.valid_before),
        nonce=bytes.fromhex(authorization.nonce[2:]),
        signature=bytes.fromhex(exact.signature[2:]),
    )


def _first(error: ValidationError) -> str:
    item = error.errors()[0]
    where = ".".join(str(part) for part in item["loc"]) or "value"
    return f"{where}: {item['msg']}"


def _bad(header: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=header, code="invalid_payment")
