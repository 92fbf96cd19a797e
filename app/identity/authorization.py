"""The Authorization message of ``POST /v1/authorize``: parsed, bounded, checked in time.

The JSON body *is* the signed EIP-712 message, field for field, so nothing in it
goes unsigned: unknown fields are refused rather than ignored. Checks that cost
nothing (shape, chain, time window) run here, before the signature is recovered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.config.settings import Settings
from app.errors import AuthenticationFailed, InvalidRequest
from app.identity import typed_data
from app.identity.addresses import parse_address
from app.identity.signature import SIGNATURE_HEADER

# The whole body: seven short fields fit in a fraction of this.
BODY_BYTES_MAX = 4096
# The nonce is a string of URL-safe ASCII: no Unicode, so two nonces that look
# equal always hash equal. 80 characters is the width of authorization_nonces.nonce.
NONCE_CHARS_MAX = 80
NONCE_PATTERN = re.compile(rf"[A-Za-z0-9._:-]{{1,{NONCE_CHARS_MAX}}}")
# Integers stay exact in JavaScript clients (Number.MAX_SAFE_INTEGER).
INTEGER_MAX = 2**53 - 1

FIELD_DOCS: dict[str, str] = {
    "wallet": (
        "Who signs: an EOA, or on Tollgate's chain a smart account (ERC-1271; ERC-6492 if"
        " not deployed yet), its owner, or its session key."
    ),
    "smartAccount": (
        "The account that pays. On Tollgate's chain a TollgateAccount that wallet owns, is,"
        " or holds a session key of; on other chains it must equal wallet."
    ),
    "sessionKey": (
        "The key this session acts with. On a deployed TollgateAccount it must be live on"
        " chain, paying Tollgate's settlement contract; the session ends when it is revoked"
        " or expires, and lasts at most until its policy's validUntil."
    ),
    "chainId": "EIP-155 chain id; must equal the domain's chainId and be supported.",
    "nonce": (
        "Unique per wallet, 1-80 characters of A-Z a-z 0-9 . _ : -; a used nonce is refused."
        " Use 32 random hex characters or a UUID."
    ),
    "issuedAt": "Unix seconds when the wallet signed.",
    "expiresAt": (
        "Unix seconds when the session ends (or the session key's validUntil, if sooner);"
        " the token's exp."
    ),
}


@dataclass(frozen=True, slots=True)
class Authorization:
    """A wallet's request for a session; addresses are lowercase."""

    wallet: str
    smart_account: str
    session_key: str
    chain_id: int
    nonce: str
    issued_at_s: int
    expires_at_s: int

    def typed_data(self) -> dict[str, object]:
        """The EIP-712 document the wallet signed, for signature recovery."""
        return typed_data.full_message(self.chain_id, {
            "wallet": self.wallet,
            "smartAccount": self.smart_account,
            "sessionKey": self.session_key,
            "chainId": self.chain_id,
            "nonce": self.nonce,
            "issuedAt": self.issued_at_s,
            "expiresAt": self.expires_at_s,
        })


def parse_authorization(body: object) -> Authorization:
    """The message from the decoded JSON body, or ``InvalidRequest`` naming the bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest(
            "the body must be a JSON object: the Authorization message", code="invalid_body"
        )
    for name in body:
        if name not in typed_data.FIELD_NAMES:
            raise InvalidRequest(
                f"unknown field {str(name)[:64]!r}: the body is exactly the signed message",
                param=str(name)[:64], code="unknown_parameter",
            )
    for name in typed_data.FIELD_NAMES:
        if name not in body:
            raise InvalidRequest(f"{name} is required", param=name, code="missing_parameter")
    nonce = body["nonce"]
    if not isinstance(nonce, str) or not NONCE_PATTERN.fullmatch(nonce):
        raise InvalidRequest(
            f"nonce must be 1-{NONCE_CHARS_MAX} characters of A-Z a-z 0-9 . _ : -",
            param="nonce", code="invalid_nonce",
        )
    return Authorization(
        wallet=parse_address(body["wallet"], "wallet"),
        smart_account=parse_address(body["smartAccount"], "smartAccount"),
        session_key=parse_address(body["sessionKey"], "sessionKey"),
        chain_id=_integer(body["chainId"], "chainId", minimum=1),
        nonce=nonce,
        issued_at_s=_integer(body["issuedAt"], "issuedAt", minimum=0),
        expires_at_s=_integer(body["expiresAt"], "expiresAt", minimum=0),
    )


def _integer(value: object, param: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{param} must be an integer", param=param, code="invalid_type")
    if not minimum <= value <= INTEGER_MAX:
        raise InvalidRequest(
            f"{param} must be between {minimum} and {INTEGER_MAX}", param=param,
            code="integer_out_of_range",
        )
    return value


def check_authorization(authorization: Authorization, settings: Settings, now_s: float) -> None:
    """The policy checks that need no signature: session length, chain, time window.

    A session longer than allowed is a malformed request (400). A chain we do not
    serve and a message outside its time window are refused credentials (401).
    """
    lifetime_s = authorization.expires_at_s - authorization.issued_at_s
    if lifetime_s <= 0:
        raise InvalidRequest(
            "expiresAt must be after issuedAt", param="expiresAt", code="invalid_expiry"
        )
    if lifetime_s > settings.session_ttl_max_s:
        raise InvalidRequest(
            f"a session may last at most {settings.session_ttl_max_s} s"
            " (expiresAt - issuedAt)", param="expiresAt", code="session_ttl_too_long",
        )
    if authorization.chain_id not in settings.chain_ids:
        supported = ", ".join(str(chain) for chain in settings.chain_ids)
        raise AuthenticationFailed(
            f"chain {authorization.chain_id} is not supported here (supported: {supported})",
            param="chainId", code="unsupported_chain",
        )
    skew_s = settings.authorize_clock_skew_s
    if authorization.issued_at_s > now_s + skew_s:
        raise AuthenticationFailed(
            "issuedAt is in the future; check the signer's clock", param="issuedAt",
            code="authorization_not_yet_valid",
        )
    if authorization.issued_at_s < now_s - settings.authorize_max_age_s:
        raise AuthenticationFailed(
            f"the authorization was signed more than {settings.authorize_max_age_s} s ago;"
            " sign a new one", param="issuedAt", code="authorization_too_old",
        )
    if authorization.expires_at_s <= now_s:
        raise AuthenticationFailed(
            "the authorization has expired", param="expiresAt", code="authorization_expired"
        )


def schema_document(settings: Settings) -> dict[str, object]:
    """What ``GET /v1/authorize/schema`` answers: everything a client needs to sign."""
    return {
        "object": "authorization.schema",
        "primaryType": typed_data.PRIMARY_TYPE,
        "types": typed_data.types(),
        "domains": [typed_data.domain(chain_id) for chain_id in settings.chain_ids],
        "fields": FIELD_DOCS,
        "signature": {
            "header": SIGNATURE_HEADER,
            "encoding": (
                "0x-prefixed hex of the 65-byte r || s || v signature (130 hex digits); a"
                " smart account's ERC-1271 or ERC-6492 signature on Tollgate's chain"
            ),
            "v": [27, 28, 0, 1],
            "low_s": "s must be at most secp256k1n / 2 (EIP-2); high-s signatures are refused",
        },
        "limits": {
            "body_bytes_max": BODY_BYTES_MAX,
            "nonce_pattern": NONCE_PATTERN.pattern,
            "session_ttl_max_s": settings.session_ttl_max_s,
            "issued_at_max_age_s": settings.authorize_max_age_s,
            "clock_skew_s": settings.authorize_clock_skew_s,
        },
        "token": {
            "type": "Bearer",
            "algorithm": settings.jwt_algorithm,
            "issuer": settings.jwt_issuer,
            "audience": settings.jwt_audience,
        },
    }
