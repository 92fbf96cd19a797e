"""Session-key policies of Tollgate accounts: read on chain, cached briefly, judged.

A session opened on a deployed TollgateAccount depends on its session key's policy:
Tollgate collects through it (``sessionDebit``, payee = the settlement contract, in
the billing token). The policy is read when the session is authorized and again, from
this cache, on every request of such a session, so a key its owner revokes, or one
that expires, loses its sessions within ``fresh_s`` (``session_policy_cache_s``)
without a chain call on the hot path while the cache is warm.

Reads of one key share a single chain call (concurrent requests of a busy session do
not each ask the node). Expiry needs no chain call at all: a cached policy past its
``validUntil`` by our clock is expired.

When the chain cannot be asked, a live session is still judged by a policy read less
than ``fresh_s + stale_grace_s`` ago, so a short RPC outage does not log every caller
out; a key revoked during the outage is then noticed when the chain answers again, at
most ``stale_grace_s`` late. Past that bound, or without any earlier read, the request
gets 503 ``chain_unavailable``. Authorizing never uses a stale read: it needs the chain
for the signature anyway.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from eth_utils import to_checksum_address

from app.chain.client import ChainClient
from app.chain.contracts import bind_contract
from app.chain.errors import ChainError
from app.errors import ServiceUnavailable

log = logging.getLogger(__name__)

ZERO_ADDRESS = "0x" + "00" * 20
# How long past its freshness a policy still serves live sessions while the chain is down.
STALE_GRACE_S = 60.0
# (account, key) pairs kept per process: a few hundred bytes each.
POLICY_ENTRIES_MAX = 50_000
# A chain outage is logged at most this often, not once per request.
OUTAGE_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """One session key's policy as its account reported it; addresses are lowercase."""

    token: str  # the zero address when the key was never granted or was revoked
    payee: str
    valid_until_s: int  # the key is live strictly before this chain timestamp
    live: bool  # the account's own verdict, at the block that was read


class PolicyFault(enum.Enum):
    """Why a session key's policy does not let Tollgate collect."""

    NOT_GRANTED = "never granted, or revoked"
    EXPIRED = "expired"
    WRONG_TERMS = "does not pay Tollgate's settlement contract in the billing token"


PolicyReader = Callable[[str, str], Awaitable[SessionPolicy]]


def chain_policy_reader(client: ChainClient) -> PolicyReader:
    """Reads ``sessionPolicy(key)`` of the TollgateAccount at ``account``; raises ``ChainError``."""

    async def read(account: str, key: str) -> SessionPolicy:
        contract = bind_contract(client.w3, "TollgateAccount", account)
        raw, live = await client.read(contract.functions.sessionPolicy(to_checksum_address(key)))
        return SessionPolicy(token=str(raw[0]).lower(), payee=str(raw[1]).lower(),
                             valid_until_s=int(raw[4]), live=bool(live))

    return read


def chain_unavailable(error: ChainError) -> ServiceUnavailable:
    """The one 503 for "the chain could not be asked", at authorize and per request."""
    return ServiceUnavailable(f"the chain could not be asked ({type(error).__name__});"
                              " retry shortly", code="chain_unavailable")


class SessionPolicies:
    """The session-key policies of one chain, and what Tollgate requires of them."""

    def __init__(
        self, reader: PolicyReader, *, chain_id: int, settlement: str, token: str,
        fresh_s: float, stale_grace_s: float = STALE_GRACE_S,
        entries_max: int = POLICY_ENTRIES_MAX,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        assert fresh_s >= 0 and stale_grace_s >= 0 and entries_max > 0
        self.reader = reader
        self.chain_id = chain_id
        self.settlement = settlement.lower()
        self.token = token.lower()
        self.fresh_s = fresh_s
        self.stale_grace_s = stale_grace_s
        self.entries_max = entries_max
        self.clock = clock
        self.wall_clock = wall_clock
        # (account, key) -> (read at, policy), oldest read first.
        self._entries: dict[tuple[str, str], tuple[float, SessionPolicy]] = {}
        self._reads: dict[tuple[str, str], asyncio.Future[SessionPolicy]] = {}
        self._outage_logged_s = -OUTAGE_LOG_INTERVAL_S

    def fault(self, policy: SessionPolicy) -> PolicyFault | None:
        """What is wrong with ``policy`` for Tollgate, or None if Tollgate may collect."""
        if policy.token == ZERO_ADDRESS:
            return PolicyFault.NOT_GRANTED
        if not policy.live or policy.valid_until_s <= self.wall_clock():
            return PolicyFault.EXPIRED
        if policy.payee != self.settlement or policy.token != self.token:
            return PolicyFault.WRONG_TERMS
        return None

    async def for_authorize(self, account: str, key: str) -> SessionPolicy:
        """A fresh cached policy if it has no fault, else the chain's answer (never stale).

        A refusal is not trusted from the cache: a key granted seconds after a refused
        attempt must work at once.
        """
        entry = self._entries.get((account, key))
        if entry is not None and self._age_s(entry) < self.fresh_s and not self.fault(entry[1]):
            return entry[1]
        return await self._read_shared((account, key))

    async def for_session(self, account: str, key: str) -> SessionPolicy:
        """The policy a live session is judged by: cached, or read, or (chain down) stale."""
        entry = self._entries.get((account, key))
        if entry is not None and self._age_s(entry) < self.fresh_s:
            return entry[1]
        try:
            return await self._read_shared((account, key))
        except ChainError as error:
            if entry is None or self._age_s(entry) >= self.fresh_s + self.stale_grace_s:
                raise
            self._log_outage(error)
            return entry[1]

    def _age_s(self, entry: tuple[float, SessionPolicy]) -> float:
        return self.clock() - entry[0]

    async def _read_shared(self, cache_key: tuple[str, str]) -> SessionPolicy:
        read = self._reads.get(cache_key)
        if read is None:
            read = asyncio.ensure_future(self._read_and_keep(cache_key))
            self._reads[cache_key] = read
            read.add_done_callback(lambda done: self._read_done(cache_key, done))
        # Shielded: one caller going away must not cancel the read the others wait for.
        return await asyncio.shield(read)

    def _read_done(self, cache_key: tuple[str, str],
                   read: asyncio.Future[SessionPolicy]) -> None:
        self._reads.pop(cache_key, None)
        if not read.cancelled():
            read.exception()  # Retrieved here, so an error nobody awaited is not logged.

    async def _read_and_keep(self, cache_key: tuple[str, str]) -> SessionPolicy:
        policy = await self.reader(*cache_key)
        # Re-inserting moves the entry to the end, so insertion order is read order.
        self._entries.pop(cache_key, None)
        while len(self._entries) >= self.entries_max:
            del self._entries[next(iter(self._entries))]
        self._entries[cache_key] = (self.clock(), policy)
        return policy

    def _log_outage(self, error: ChainError) -> None:
        now_s = self.clock()
        if now_s - self._outage_logged_s >= OUTAGE_LOG_INTERVAL_S:
            self._outage_logged_s = now_s
            log.warning("chain unavailable for session-key checks (%s); serving policies read"
                        " up to %.0f s ago", error, self.fresh_s + self.stale_grace_s)
