"""Who may authorize a session for which account, and on which chain.

``POST /v1/authorize`` asks an ``AuthorizationVerifier`` whether the wallet
signed the message and may act for ``smartAccount`` with ``sessionKey``. It gets
the parsed message and the raw signature bytes (up to ``SIGNATURE_BYTES_MAX``),
after every cheap check and before anything is written, and answers the
on-chain session-key policy the session will depend on, if any.

    EoaVerifier        an externally owned wallet that pays for itself (no chain)
    ChainVerifier      smart accounts on Tollgate's chain (chain_verifier.py)
    PerChainVerifier   the chain verifier for its chain, another for every other

With a chain configured, ``setup_identity`` installs ``PerChainVerifier``: only
the chain Tollgate reads can prove smart accounts, so an Authorization for any
other supported chain id is verified as an EOA's (``smartAccount == wallet``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from app.errors import AuthenticationFailed, PermissionDenied
from app.identity.authorization import Authorization
from app.identity.session_policy import SessionPolicy
from app.identity.signature import SIGNATURE_HEADER, EcdsaSignature, recover_signer


class AuthorizationVerifier(Protocol):
    """Proves an Authorization; raises, never returns False."""

    async def verify(self, authorization: Authorization,
                     signature: bytes) -> SessionPolicy | None:
        """Raise ``AuthenticationFailed`` if ``wallet`` did not sign the message, or
        ``PermissionDenied`` if it may not act for ``smartAccount`` with ``sessionKey``;
        else the live session-key policy the session depends on (None: no policy)."""


class EoaVerifier:
    """The wallet is an EOA (65-byte low-s ECDSA) and its own smart account."""

    async def verify(self, authorization: Authorization,
                     signature: bytes) -> SessionPolicy | None:
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
                " verified on this chain", param="smartAccount",
                code="smart_account_not_verified",
            )
        return None


class PerChainVerifier:
    """Routes each Authorization to the verifier of its chain id, or to ``default``."""

    def __init__(self, verifiers: Mapping[int, AuthorizationVerifier], *,
                 default: AuthorizationVerifier) -> None:
        self.verifiers = dict(verifiers)
        self.default = default

    async def verify(self, authorization: Authorization,
                     signature: bytes) -> SessionPolicy | None:
        verifier = self.verifiers.get(authorization.chain_id, self.default)
        return await verifier.verify(authorization, signature)
