"""What Tollgate asks a payer for: the x402 ``PaymentRequired`` answer of a 402.

One requirement, scheme ``exact`` (EIP-3009 ``TransferWithAuthorization``), paid to
Tollgate's settlement contract in the chain's USDC. The same JSON goes base64 in the
``PAYMENT-REQUIRED`` header (v2) and as the body (for v1 clients, which read the body).
"""

from __future__ import annotations

from typing import Any

from x402.http.constants import PAYMENT_REQUIRED_HEADER
from x402.http.utils import encode_payment_required_header
from x402.schemas import PaymentRequired as X402PaymentRequired
from x402.schemas import PaymentRequirements, ResourceInfo

from app.errors import PaymentRequired
from app.payments.assets import PaymentAsset

SCHEME = "exact"
# Long enough for the payer to sign and for the settlement to be mined and confirmed.
MAX_TIMEOUT_S = 300


def requirement(asset: PaymentAsset, pay_to: str, amount_micros: int) -> PaymentRequirements:
    assert amount_micros > 0, "a payment requirement asks for something"
    return PaymentRequirements(
        scheme=SCHEME, network=asset.network, asset=asset.address, amount=str(amount_micros),
        pay_to=pay_to, max_timeout_seconds=MAX_TIMEOUT_S,
        extra={"name": asset.name, "version": asset.version},
    )


class X402PaymentRequiredError(PaymentRequired):
    """A 402 whose body and ``PAYMENT-REQUIRED`` header carry the x402 requirement."""

    def __init__(self, message: str, *, required: X402PaymentRequired,
                 code: str = "payment_required") -> None:
        super().__init__(message, code=code, headers={
            PAYMENT_REQUIRED_HEADER: encode_payment_required_header(required),
        })
        self.required = required

    def body(self) -> dict[str, Any]:
        # x402 clients read `error` as a string and `accepts` beside it, so the body is the
        # x402 document itself (camelCase, as on the wire), not the OpenAI error object.
        return self.required.model_dump(by_alias=True, exclude_none=True, mode="json")


def payment_required(message: str, *, asset: PaymentAsset, pay_to: str, amount_micros: int,
                     resource_url: str, code: str = "payment_required"
                     ) -> X402PaymentRequiredError:
    required = X402PaymentRequired(
        x402_version=2,
        error=message,
        resource=ResourceInfo(url=resource_url, description="Tollgate LLM usage",
                              mime_type="application/json", service_name="Tollgate"),
        accepts=[requirement(asset, pay_to, amount_micros)],
    )
    return X402PaymentRequiredError(message, required=required, code=code)
