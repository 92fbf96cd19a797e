"""Test wallets that sign Authorizations the way a client would, from the published schema.

The EIP-712 types are written out here on purpose rather than imported from the
app: they are a public contract, and a change on the server side must break
these tests.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import aiohttp
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from multidict import CIMultiDictProxy

CHAIN_ID = 31337
SESSION_TTL_S = 3600
SIGNATURE_HEADER = "X-Authorization-Signature"

TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
    ],
    "Authorization": [
        {"name": "wallet", "type": "address"},
        {"name": "smartAccount", "type": "address"},
        {"name": "sessionKey", "type": "address"},
        {"name": "chainId", "type": "uint256"},
        {"name": "nonce", "type": "string"},
        {"name": "issuedAt", "type": "uint256"},
        {"name": "expiresAt", "type": "uint256"},
    ],
}


def new_wallet() -> LocalAccount:
    return Account.create()


def message(signer: LocalAccount, /, **overrides: Any) -> dict[str, Any]:
    """A valid Authorization message for ``signer``, paying for itself; fields overridable."""
    now_s = int(time.time())
    body: dict[str, Any] = {
        "wallet": signer.address,
        "smartAccount": signer.address,
        "sessionKey": Account.create().address,
        "chainId": CHAIN_ID,
        "nonce": secrets.token_hex(16),
        "issuedAt": now_s,
        "expiresAt": now_s + SESSION_TTL_S,
    }
    body.update(overrides)
    return body


def typed_data(body: dict[str, Any], *, domain_chain_id: int | None = None
               ) -> dict[str, Any]:
    """``body`` as the EIP-712 document a wallet signs."""
    chain_id = body["chainId"] if domain_chain_id is None else domain_chain_id
    return {
        "types": TYPES,
        "primaryType": "Authorization",
        "domain": {"name": "Tollgate", "version": "1", "chainId": chain_id},
        "message": body,
    }


def sign(wallet: LocalAccount, body: dict[str, Any], *, domain_chain_id: int | None = None
         ) -> str:
    """The 0x hex signature of ``body`` as EIP-712 typed data (v is 27 or 28)."""
    signed = wallet.sign_typed_data(full_message=typed_data(body,
                                                            domain_chain_id=domain_chain_id))
    return "0x" + bytes(signed.signature).hex()


def digest(body: dict[str, Any]) -> bytes:
    """The EIP-712 digest of ``body``: what a contract wallet's signature covers (ERC-1271)."""
    signable = encode_typed_data(full_message=typed_data(body))
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


async def post_authorization(
    http: aiohttp.ClientSession, base_url: str, body: Any, signature: str | None,
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    """POST /v1/authorize as given; (status, JSON body, headers)."""
    headers = {} if signature is None else {SIGNATURE_HEADER: signature}
    async with http.post(f"{base_url}/v1/authorize", json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers


async def authorize(
    http: aiohttp.ClientSession, base_url: str, signer: LocalAccount | None = None, /,
    **overrides: Any,
) -> dict[str, Any]:
    """Open a session for ``signer`` (a fresh wallet by default) and return the 201 body.

    ``base_url`` is the server root (``http://host:port``), without ``/v1``.
    """
    signer = signer or new_wallet()
    body = message(signer, **overrides)
    status, answer, _ = await post_authorization(http, base_url, body, sign(signer, body))
    assert status == 201, answer
    return answer


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
