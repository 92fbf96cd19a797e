"""Authorizations for smart accounts, proven on chain (the contracts issue's verifier).

Who may open a session for ``smartAccount``:
  - the account itself (``wallet == smartAccount``): its signature is checked as an EOA's,
    by ERC-1271 if it has code, or by ERC-6492 if it is not deployed yet (from an
    allowlisted factory);
  - the account's owner (``wallet`` is ``owner()`` of the deployed account), with an EOA
    signature;
  - a session key of the account (``wallet == sessionKey``), with an EOA signature, if
    the key is live on chain.
For a deployed account the ``sessionKey`` must be live on chain with Tollgate's
settlement contract as payee and the billing token as token, so Tollgate can collect
within the policy the owner set. Policy reads are cached for ``POLICY_CACHE_S``: a key
revoked on chain stops opening sessions within that time.

Not yet here: re-checking the policy of a live session on every request (a revoked or
expired key keeping its session); that belongs in the authentication path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address

from app.chain.client import ChainClient
from app.chain.contracts import bind_contract
from app.chain.errors import ChainError
from app.chain.signatures import verify_signature
from app.errors import AuthenticationFailed, PermissionDenied, ServiceUnavailable
from app.identity.authorization import Authorization
from app.identity.signature import SIGNATURE_HEADER

POLICY_CACHE_S = 10.0
POLICY_CACHE_ENTRIES_MAX = 10_000


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    token: str
    payee: str
    live: bool


def authorization_digest(authorization: Authorization) -> bytes:
    """The EIP-712 digest the wallet signed."""
    signable = encode_typed_data(full_message=authorization.typed_data())
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


class ChainVerifier:
    """An ``AuthorizationVerifier`` that proves ownership and session keys on chain."""

    def __init__(
        self,
        client: ChainClient,
        *,
        settlement: str,
        token: str,
        factory_allowlist: set[str],
    ) -> None:
        self.client = client
        self.settlement = settlement.lower()
        self.token = token.lower()
        self.factory_allowlist = {factory.lower() for factory in factory_allowlist}
        self._policies: dict[tuple[str, str], tuple[float, SessionPolicy]] = {}

    async def verify(self, authorization: Authorization, signature: bytes) -> None:
        try:
            await self._verify(authorization, signature)
        except ChainError as error:
            raise ServiceUnavailable(
                f"the chain could not be asked ({type(error).__name__})",
                code="chain_unavailable",
            ) from None

    async def _verify(self, authorization: Authorization, signature: bytes) -> None:
        wallet, account = authorization.wallet, authorization.smart_account
        valid = await verify_signature(
            self.client, wallet, authorization_digest(authorization), signature,
            factory_allowlist=self.factory_allowlist,
        )
        if not valid:
            raise AuthenticationFailed(
                "the signature was not made by wallet over this message",
                param=SIGNATURE_HEADER, code="signature_mismatch",
            )
        deployed = bool(await self.client.code_at(account))
        if wallet != account:
            if not deployed:
                raise PermissionDenied(
                    "smartAccount is not deployed: sign as the account itself (ERC-6492)",
                    param="smartAccount", code="smart_account_not_deployed",
                )
            if wallet != authorization.session_key and wallet != await self._owner(account):
                raise PermissionDenied(
                    "wallet is neither the owner of smartAccount nor its session key",
                    param="wallet", code="smart_account_not_owned",
                )
        if deployed and await self._code_is_account(account):
            await self._require_live_session_key(account, authorization.session_key)

    async def _owner(self, account: str) -> str:
        contract = bind_contract(self.client.w3, "TollgateAccount", account)
        owner = await self.client.read(contract.functions.owner())
        return str(owner).lower()

    async def _code_is_account(self, account: str) -> bool:
        """Only Tollgate accounts have session policies; an EOA delegating elsewhere has none."""
        try:
            await self._owner(account)
        except ChainError:
            return False
        return True

    async def _require_live_session_key(self, account: str, session_key: str) -> None:
        policy = await self._policy(account, session_key)
        if not policy.live:
            raise PermissionDenied(
                "sessionKey is not live on chain for smartAccount (never granted, revoked"
                " or expired)", param="sessionKey", code="session_key_not_live",
            )
        if policy.payee != self.settlement or policy.token != self.token:
            raise PermissionDenied(
                "sessionKey's policy does not pay Tollgate's settlement contract in the"
                " billing token", param="sessionKey", code="session_key_wrong_payee",
            )

    async def _policy(self, account: str, session_key: str) -> SessionPolicy:
        now_s = time.monotonic()
        cached = self._policies.get((account, session_key))
        if cached is not None and cached[0] > now_s:
            return cached[1]
        contract = bind_contract(self.client.w3, "TollgateAccount", account)
        raw_policy, live = await self.client.read(
            contract.functions.sessionPolicy(to_checksum_address(session_key))
        )
        policy = SessionPolicy(token=str(raw_policy[0]).lower(), payee=str(raw_policy[1]).lower(),
                              live=bool(live))
        if len(self._policies) >= POLICY_CACHE_ENTRIES_MAX:
            self._policies.clear()
        self._policies[(account, session_key)] = (now_s + POLICY_CACHE_S, policy)
        return policy
