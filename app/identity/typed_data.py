"""The EIP-712 domain and types a wallet signs to authorize a session.

The domain has no ``verifyingContract``: the signature is addressed to the
Tollgate service, not to a contract, and ``chainId`` in both the domain and the
message binds it to one chain. The type strings are part of the public contract
(``GET /v1/authorize/schema`` publishes them); changing one invalidates every
client's signatures, so it needs a new ``DOMAIN_VERSION``.
"""

from __future__ import annotations

DOMAIN_NAME = "Tollgate"
DOMAIN_VERSION = "1"
PRIMARY_TYPE = "Authorization"

DOMAIN_FIELDS: tuple[dict[str, str], ...] = (
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
)

AUTHORIZATION_FIELDS: tuple[dict[str, str], ...] = (
    {"name": "wallet", "type": "address"},
    {"name": "smartAccount", "type": "address"},
    {"name": "sessionKey", "type": "address"},
    {"name": "chainId", "type": "uint256"},
    {"name": "nonce", "type": "string"},
    {"name": "issuedAt", "type": "uint256"},
    {"name": "expiresAt", "type": "uint256"},
)

FIELD_NAMES: tuple[str, ...] = tuple(field["name"] for field in AUTHORIZATION_FIELDS)


def domain(chain_id: int) -> dict[str, object]:
    return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": chain_id}


def types() -> dict[str, list[dict[str, str]]]:
    """Fresh copies: eth-account and JSON encoders get lists they may not share."""
    return {
        "EIP712Domain": [dict(field) for field in DOMAIN_FIELDS],
        PRIMARY_TYPE: [dict(field) for field in AUTHORIZATION_FIELDS],
    }


def full_message(chain_id: int, message: dict[str, object]) -> dict[str, object]:
    """The whole typed-data document, as ``eth_account.messages.encode_typed_data`` takes it."""
    assert set(message) == set(FIELD_NAMES), "the message has exactly the typed fields"
    return {
        "types": types(),
        "primaryType": PRIMARY_TYPE,
        "domain": domain(chain_id),
        "message": message,
    }
