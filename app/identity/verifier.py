"""Who may authorize a session for which account: the seam for on-chain verification.

``POST /v1/authorize`` asks an ``AuthorizationVerifier`` whether the wallet
signed the message and may act for ``smartAccount`` with ``sessionKey``. Today
``EoaVerifier`` answers: an externally owned wallet that pays for itself.

The contracts issue replaces it (``setup_identity(app, verifier=...)``) with a
verifier that also accepts contract-wallet signatures (ERC-1271
``isValidSignature``, ERC-6492 for accounts not yet deployed), proves on chain
that ``wallet`` owns ``smartAccount``, and that ``sessionKey`` is registered
with it. Nothing else in identity changes: the verifier gets the parsed message
and the raw signature bytes (up to ``SIGNATURE_BYTES_MAX``), after every cheap
check and before anything is written.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from app.errors import AuthenticationFailed, PermissionDenied
from app.identity.authorization import Authorization
from app.identity.signature import SIGNATURE_HEADER, EcdsaSignature, recover_signer


class AuthorizationVerifier(Protocol):
    """Proves an Authorization; raises, never returns False."""

    async def verify(self, authorization: Authorization, signature: bytes) -> None:
        """Raise ``AuthenticationFailed`` if ``wallet`` did not sign the message, or
        ``PermissionDenied`` if it may not act for ``smartAccount`` with ``sessionKey``."""


class EoaVerifier:
    """The wallet is an EOA (65-byte low-s ECDSA) and its own smart account."""

    async def verify(self, authorization: Authorization, signature: bytes) -> None:
        ecdsa = EcdsaSignature.parse(signature)
        # Pure-Python recovery takes ~10 ms of CPU; a thread keeps the loop serving.
        signer = await asyncio.to_thread(recover_signer, authorization.typed_data(), ecdsa)
        if signer != authorization.wallet:
            raise AuthenticationFailed(
                "the signature was not made by wallet over this message",
                param=SIGNATURE_HEADER, code="signature_mismatch",
            )
        if authorization.smart_account != authorization.wallet:
            raise PermissionDenied(
                "smartAccount must equal wallet: smart account ownership cannot be"
                " verified yet", param="smartAccount", code="smart_account_not_verified",
            )
