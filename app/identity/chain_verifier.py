"""Authorizations for smart accounts, proven on chain.

Who may open a session for ``smartAccount``:
  - the account itself (``wallet == smartAccount``): its signature is checked as an EOA's,
    by ERC-1271 if it has code, or by ERC-6492 if it is not deployed yet (from an
    allowlisted factory);
  - the account's owner (``wallet`` is ``owner()`` of the deployed account), with an EOA
    signature;
  - a session key of the account (``wallet == sessionKey``), with an EOA signature, if
    the key is live on chain.
For a deployed TollgateAccount the ``sessionKey`` must be live on chain with Tollgate's
settlement contract as payee and the billing token as token, so Tollgate can collect
within the policy the owner set; whoever signed, the session then depends on that policy
(``verify`` returns it) and is re-checked on every request (``SessionPolicies``). An
account not deployed yet has no policies: its session depends on none.

This verifier serves one chain, the client's; ``PerChainVerifier`` sends every other
chain elsewhere.
"""

from __future__ import annotations

from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address

from app.chain.client import ChainClient
from app.chain.errors import ChainError, TransactionReverted
from app.chain.signatures import verify_signature
from app.errors import AuthenticationFailed, PermissionDenied
from app.identity.authorization import Authorization
from app.identity.session_policy import (
    PolicyFault,
    SessionPolicies,
    SessionPolicy,
    chain_policy_reader,
    chain_unavailable,
)
from app.identity.signature import SIGNATURE_HEADER

OWNER_SELECTOR = keccak(text="owner()")[:4]
# How long a policy read is trusted when the caller does not share its cache.
POLICY_CACHE_S = 10.0

# At authorize a bad policy is a permission problem of this signer (403), code by fault.
_REFUSAL_CODES = {
    PolicyFault.NOT_GRANTED: "session_key_not_live",
    PolicyFault.EXPIRED: "session_key_expired",
    PolicyFault.WRONG_TERMS: "session_key_wrong_payee",
}


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
        policies: SessionPolicies | None = None,
    ) -> None:
        self.client = client
        self.factory_allowlist = {factory.lower() for factory in factory_allowlist}
        self.policies = policies or SessionPolicies(
            chain_policy_reader(client), chain_id=client.chain_id, settlement=settlement,
            token=token, fresh_s=POLICY_CACHE_S,
        )
        assert self.policies.chain_id == client.chain_id, "policies of this verifier's chain"
        assert self.policies.settlement == settlement.lower()
        assert self.policies.token == token.lower()

    async def verify(self, authorization: Authorization,
                     signature: bytes) -> SessionPolicy | None:
        assert authorization.chain_id == self.client.chain_id, "routed by chain id"
        try:
            return await self._verify(authorization, signature)
        except ChainError as error:
            raise chain_unavailable(error) from None

    async def _verify(self, authorization: Authorization,
                      signature: bytes) -> SessionPolicy | None:
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
        # Only Tollgate accounts have an owner and session policies; an EOA delegating
        # its code elsewhere, or another contract wallet, has neither.
        owner = await self._owner(account) if deployed else None
        policy = None
        if owner is not None:
            policy = await self._policy(account, authorization.session_key)
        if wallet != account:
            _require_acting_for(authorization, deployed=deployed, owner=owner,
                                tollgate_account=policy is not None)
        if policy is not None:
            fault = self.policies.fault(policy)
            if fault is not None:
                raise PermissionDenied(
                    f"sessionKey's policy on smartAccount {fault.value}: Tollgate cannot"
                    " collect with it", param="sessionKey", code=_REFUSAL_CODES[fault],
                )
        return policy

    async def _owner(self, account: str) -> str | None:
        """``owner()`` of the contract at ``account``; None if it has no such function.

        A raw call, so only "the contract said no" means None: a node that cannot be
        reached raises, and an unreachable chain never passes for "not an account".
        """
        try:
            result = await self.client.call({"to": to_checksum_address(account),
                                             "data": OWNER_SELECTOR})
        except TransactionReverted:
            return None
        if len(result) != 32 or any(result[:12]):
            return None
        return "0x" + result[12:].hex()

    async def _policy(self, account: str, session_key: str) -> SessionPolicy | None:
        """The key's policy; None if the contract has no ``sessionPolicy`` (not ours)."""
        try:
            return await self.policies.for_authorize(account, session_key)
        except TransactionReverted:
            return None


def _require_acting_for(authorization: Authorization, *, deployed: bool, owner: str | None,
                        tollgate_account: bool) -> None:
    """A wallet other than the account signed: it must be the owner or the session key."""
    if not deployed:
        raise PermissionDenied(
            "smartAccount is not deployed: sign as the account itself (ERC-6492)",
            param="smartAccount", code="smart_account_not_deployed",
        )
    if not tollgate_account:
        # Whose key may act for a foreign contract is not ours to know.
        raise PermissionDenied(
            "smartAccount is not a Tollgate account: only the account itself may sign for it"
            " (ERC-1271)", param="smartAccount", code="smart_account_not_supported",
        )
    if authorization.wallet not in (authorization.session_key, owner):
        raise PermissionDenied(
            "wallet is neither the owner of smartAccount nor its session key",
            param="wallet", code="smart_account_not_owned",
        )
