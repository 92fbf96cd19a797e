"""The identity service: authorize a wallet, authenticate a token, revoke sessions.

Authenticating a request costs: one local JWT verification, one Redis GET (is
the session revoked?), and the session's account row from a 2 s in-process
cache (Postgres on a miss; a row over 1 s old is reloaded in the background).
Concurrent misses of one session share a single read: a burst of an agent's calls
after a pause costs one query, not one per call (and no surge of new pooled
connections). When Redis cannot answer, Postgres decides. A chat call whose row is cached skips
the GET while the revocation feed is live (``app.identity.revocation_feed``).

A session that depends on a session key's on-chain policy (``session_key_bound``:
opened on a deployed TollgateAccount) also needs that policy to be live, judged
from ``SessionPolicies``' cache (a chain call only when it is older than
``session_policy_cache_s``): once the owner revokes the key, or it expires, the
session is refused with 401 ``session_key_revoked`` / ``session_key_expired``. Its
token never outlives the policy: ``exp`` is clamped to the policy's ``validUntil``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from app.chain.errors import ChainError
from app.config.settings import Settings
from app.errors import PermissionDenied, ServiceUnavailable
from app.identity.account_cache import SessionAccountCache
from app.identity.authorization import Authorization, check_authorization
from app.identity.principal import Principal
from app.identity.revocation_feed import RevocationFeed
from app.identity.revocation_list import RevocationList
from app.identity.session_policy import (
    PolicyFault,
    SessionPolicies,
    SessionPolicy,
    chain_unavailable,
)
from app.identity.session_store import Account, SessionAccount, SessionStore
from app.identity.tokens import SessionClaims, TokenCodec, account_reference, token_refused
from app.identity.verifier import AuthorizationVerifier

log = logging.getLogger(__name__)

JTI_BYTES = 16
# An aging cached row is reloaded this long after the request that found it.
RELOAD_DELAY_S = 0.1


@dataclass(frozen=True, slots=True)
class RevocationCheck:
    """A session's revocation check, sent to Redis and not yet read."""

    jti: str
    reply: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class Early:
    """An early authentication: the principal, and the check still to confirm (if any)."""

    principal: Principal
    check: RevocationCheck | None


@dataclass(frozen=True, slots=True)
class IssuedSession:
    """A new session and its token: the body of the 201 answer to POST /v1/authorize."""

    token: str
    jti: str
    expires_at_s: int
    account: Account

    def body(self) -> dict[str, object]:
        return {
            "object": "session",
            "token": self.token,
            "expiresAt": self.expires_at_s,
            "sessionId": self.jti,
            "account": {
                "id": account_reference(self.account.id),
                "wallet": self.account.wallet,
                "smartAccount": self.account.smart_account,
                "chainId": self.account.chain_id,
            },
        }


class Sessions:
    """Everything identity does at request time, with the parts it needs."""

    def __init__(
        self, settings: Settings, *, codec: TokenCodec, store: SessionStore,
        revocations: RevocationList, cache: SessionAccountCache,
        verifier: AuthorizationVerifier, policies: SessionPolicies | None = None,
        feed: RevocationFeed | None = None,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.store = store
        self.revocations = revocations
        self.cache = cache
        self.verifier = verifier
        # None: no chain, so no session can depend on a session-key policy here.
        self.policies = policies
        # While live, it drops revoked sessions' rows as they are revoked anywhere.
        self.feed = feed
        # Background reloads of aging cache rows, one per session at a time.
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        # Reads of session rows in flight, shared by every request that needs one.
        self._loading: dict[str, tuple[int, asyncio.Task[SessionAccount | None]]] = {}

    async def authorize(self, authorization: Authorization, signature: bytes) -> IssuedSession:
        """Check, verify, record, then sign: the token exists only for a committed session."""
        now_s = time.time()
        check_authorization(authorization, self.settings, now_s)
        policy = await self.verifier.verify(authorization, signature)
        jti = secrets.token_hex(JTI_BYTES)
        issued_at_s = int(now_s)
        expires_at_s = _session_expiry(authorization, policy, now_s)
        account = await self.store.create(
            authorization, jti=jti, issued_at_s=issued_at_s, expires_at_s=expires_at_s,
            credit_limit_micros=self.settings.default_credit_limit_micros,
        )
        token = self.codec.issue(SessionClaims(
            account_id=account.id, wallet=authorization.wallet,
            smart_account=authorization.smart_account, chain_id=authorization.chain_id,
            session_key=authorization.session_key, jti=jti, issued_at_s=issued_at_s,
            expires_at_s=expires_at_s, session_key_bound=policy is not None,
        ))
        log.info("session %s opened for %s (wallet %s)", jti, account_reference(account.id),
                 authorization.wallet)
        return IssuedSession(token, jti, expires_at_s, account)

    async def authenticate(self, token: str) -> Principal:
        """The principal of a live session token, or 401 (bad token) / 403 (suspended)."""
        return await self._authenticate(self.codec.verify(token))

    async def authenticate_early(self, token: str) -> Early:
        """``authenticate``, except that a session whose row is cached (it passed a full
        check moments ago) is let through at once: while the revocation feed is live
        the row is proof enough (a revocation would have dropped it); otherwise Redis
        is asked meanwhile whether it was revoked since.

        The caller must ``confirm`` a returned check before anything is served. A
        revocation found that way forgets the row, so the session's next request is
        checked in full first: a revoked token costs at most one overlapped call.
        """
        claims = self.codec.verify(token)
        cached = self.cache.lookup(claims.jti)
        if cached.row is None:
            return Early(await self._authenticate(claims), None)
        check = None
        if self.feed is None or not self.feed.live:
            check = RevocationCheck(claims.jti, self.revocations.ask(claims.jti))
        if cached.refresh:
            self._refresh_soon(claims.jti)
        return Early(await self._principal(claims, cached.row), check)

    async def confirm(self, check: RevocationCheck) -> None:
        """The session of an early authentication was not revoked, or a 401."""
        revoked = await self.revocations.answer(check.reply)
        if revoked:
            self.cache.drop(check.jti)
            raise token_refused("the session was revoked", "token_revoked")
        if revoked is None:
            # Redis could not answer: Postgres is the truth, as in ``authenticate``.
            row = await self._load(check.jti)
            if row is None:
                raise token_refused("the session does not exist", "unknown_session")
            if row.revoked:
                raise token_refused("the session was revoked", "token_revoked")
            if row.account.status != "active":
                raise PermissionDenied("the account is suspended", code="account_suspended")

    async def _authenticate(self, claims: SessionClaims) -> Principal:
        revoked = await self.revocations.is_revoked(claims.jti)
        if revoked:
            raise token_refused("the session was revoked", "token_revoked")
        # Without an answer from Redis the row is read fresh: Postgres is the truth.
        row = None
        if revoked is not None:
            cached = self.cache.lookup(claims.jti)
            row = cached.row
            if cached.refresh:
                self._refresh_soon(claims.jti)
        if row is None:
            row = await self._load(claims.jti)
            if row is None:
                raise token_refused("the session does not exist", "unknown_session")
        return await self._principal(claims, row)

    async def _load(self, jti: str) -> SessionAccount | None:
        """Read a session's row from Postgres and cache it, sharing a read in flight.

        Only a read begun since the cache's last drop is shared: a request that
        arrives after a revocation never gets a row read before it. The read is a
        task of its own, so a waiter that goes away (its client left) does not
        cancel it for the others.
        """
        generation = self.cache.generation
        loading = self._loading.get(jti)
        if loading is None or loading[0] != generation:
            task = asyncio.ensure_future(self._read_and_cache(jti, generation))
            loading = (generation, task)
            self._loading[jti] = loading
            task.add_done_callback(lambda done: self._forget_load(jti, done))
        return await asyncio.shield(loading[1])

    async def _read_and_cache(self, jti: str, generation: int) -> SessionAccount | None:
        row = await self.store.load(jti)
        if row is not None:
            self.cache.put(row, generation)
        return row

    def _forget_load(self, jti: str, done: asyncio.Task[SessionAccount | None]) -> None:
        loading = self._loading.get(jti)
        if loading is not None and loading[1] is done:
            del self._loading[jti]
        # Read here, so a failure whose waiters all left is not reported as lost.
        if not done.cancelled():
            done.exception()

    async def _principal(self, claims: SessionClaims, row: SessionAccount) -> Principal:
        if row.revoked:
            raise token_refused("the session was revoked", "token_revoked")
        _check_agreement(claims, row)
        if row.account.status != "active":
            raise PermissionDenied("the account is suspended", code="account_suspended")
        if claims.session_key_bound:
            await self._require_live_session_key(claims)
        return Principal(
            account_id=row.account.id,
            chain_id=row.chain_id,
            wallet=row.wallet,
            smart_account=row.account.smart_account,
            session_jti=row.jti,
            session_key=row.session_key,
            rate_limit_requests_per_min=row.account.rate_limit_requests_per_min,
            rate_limit_tokens_per_min=row.account.rate_limit_tokens_per_min,
        )

    def _refresh_soon(self, jti: str) -> None:
        if jti not in self._refreshing:
            self._refreshing[jti] = asyncio.ensure_future(self._refresh(jti))

    async def _refresh(self, jti: str) -> None:
        try:
            # Not now: the request that found the row aging is still before its first
            # byte, and a reload then competes with it for the loop and the database.
            await asyncio.sleep(RELOAD_DELAY_S)
            row = await self._load(jti)
        except Exception as error:  # The row still expires at its TTL.
            log.debug("cached session row not reloaded: %s", error)
        else:
            if row is None:
                self.cache.drop(jti)
        finally:
            del self._refreshing[jti]

    @property
    def reloads(self) -> tuple[asyncio.Task[None], ...]:
        """The background reloads of cached rows now running."""
        return tuple(self._refreshing.values())

    async def close(self) -> None:
        """Stop background reloads (at shutdown)."""
        tasks = [*self._refreshing.values(), *(task for _, task in self._loading.values())]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _require_live_session_key(self, claims: SessionClaims) -> None:
        """The session's key still lets Tollgate collect, or a 401 saying why not."""
        policies = self.policies
        if policies is None or policies.chain_id != claims.chain_id:
            # Tokens are shared by every instance; this one does not read that chain.
            raise ServiceUnavailable(
                f"this server cannot check session keys on chain {claims.chain_id}",
                code="chain_unavailable",
            )
        try:
            policy = await policies.for_session(claims.smart_account, claims.session_key)
        except ChainError as error:
            raise chain_unavailable(error) from None
        fault = policies.fault(policy)
        if fault is not None:
            message, code = _SESSION_KEY_REFUSALS[fault]
            raise token_refused(message, code)

    async def revoke_session(self, principal: Principal, jti: str) -> list[str] | None:
        """Revoke one of the principal's account's sessions; None if it has no such one."""
        revoked = await self.store.revoke_session(principal.account_id, jti)
        if revoked is None:
            return None
        await self.revocations.publish(revoked)
        return [session.jti for session in revoked]

    async def revoke_account(self, principal: Principal) -> list[str]:
        revoked = await self.store.revoke_account(principal.account_id, self.codec.leeway_s)
        await self.revocations.publish(revoked)
        log.info("%d session(s) of %s revoked by the account", len(revoked),
                 account_reference(principal.account_id))
        return [session.jti for session in revoked]

    async def revoke_wallet(self, wallet: str) -> list[str]:
        revoked = await self.store.revoke_wallet(wallet, self.codec.leeway_s)
        await self.revocations.publish(revoked)
        log.warning("%d session(s) of wallet %s revoked by the operator", len(revoked), wallet)
        return [session.jti for session in revoked]

    async def has_live_session(self, wallet: str) -> bool:
        return await self.store.wallet_has_live_session(wallet)


def _session_expiry(authorization: Authorization, policy: SessionPolicy | None,
                    now_s: float) -> int:
    """The signed expiresAt, or the policy's end if sooner: a session never outlives its key."""
    if policy is None:
        return authorization.expires_at_s
    if policy.valid_until_s <= now_s:
        # The verifier judged the policy live a moment ago; only a chain clock ahead of ours
        # gets here, and the key is then as good as expired.
        raise PermissionDenied("sessionKey's policy has expired", param="sessionKey",
                               code="session_key_expired")
    return min(authorization.expires_at_s, policy.valid_until_s)


# Keeping a session: the key went bad after the session opened, so its token is refused.
_SESSION_KEY_REFUSALS: dict[PolicyFault, tuple[str, str]] = {
    PolicyFault.NOT_GRANTED: ("the session key was revoked on chain", "session_key_revoked"),
    PolicyFault.EXPIRED: ("the session key has expired on chain", "session_key_expired"),
    PolicyFault.WRONG_TERMS: ("the session key's policy no longer pays Tollgate",
                              "session_key_policy_changed"),
}


def _check_agreement(claims: SessionClaims, row: SessionAccount) -> None:
    """A token we signed always agrees with its session row; if not, refuse and say so."""
    if (claims.account_id, claims.wallet, claims.chain_id, claims.session_key) != (
        row.account.id, row.wallet, row.chain_id, row.session_key
    ) or claims.smart_account != row.account.smart_account:
        log.error("token of session %s disagrees with its row: key leaked or a bug", claims.jti)
        raise token_refused("the session token's claims are invalid", "invalid_token_claims")


SESSIONS = web.AppKey("identity_sessions", Sessions)
