"""The ledger stage: a hold before forwarding, a usage record (or a release) after.

``admit`` reserves the call's maximum cost on its account, atomically with the
balance rule (``app.ledger.holds``), or refuses with 402. A busy account's calls
are admitted on a credit lease instead (``app.ledger.leases``): credit this process
reserved for many calls, spent without a round trip. When the account's last
hold here left room for this one, the hold is deferred (``ChatCall.defer``): it is
taken while the upstream is asked, and nothing reaches the client before it is.
``settle`` prices the outcome and writes its usage record, which resolves the
hold in the same transaction (``app.ledger.recorder``); a call that produced
nothing only releases its hold. Every admitted call settles exactly once (the pipeline's
promise), so every hold is resolved once; a process that dies in between leaves
its holds to expire (``app.ledger.expiry``).
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from app.config.settings import Settings
from app.errors import ApiError, ServiceUnavailable
from app.http.metrics import Metrics
from app.ledger.balance import AccountBalance, read_balance
from app.ledger.holds import HoldRequest, HoldTaker, Taken, hold_lifetime_s, max_cost_micros
from app.ledger.leases import CreditLeases, LeaseUse
from app.ledger.money import COST_UNIT, Cost, price_usage
from app.ledger.recorder import UsageEntry, UsageRecorder, Written
from app.proxy.pipeline import ChatCall

log = logging.getLogger(__name__)

# A refused hold is checked against a fresh read of the account; when holds released
# in between make it fit after all, the hold is tried again, this many times in all.
ADMIT_ATTEMPTS = 3
# Accounts whose room is remembered (for overlapping admission), at most.
ROOM_ACCOUNTS_MAX = 100_000


async def _answer(taking: asyncio.Task[None]) -> None:
    await taking


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("the ledger is unavailable; the request was not forwarded",
                              code="ledger_unavailable")


class LedgerStage:
    """Holds the most a call can cost, then records what it did cost."""

    name = "ledger"

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.commission_bps = settings.commission_bps
        self.metrics = metrics
        # Set at startup.
        self.engine: AsyncEngine | None = None
        self.holds: HoldTaker | None = None
        self.recorder: UsageRecorder | None = None
        self.leases: CreditLeases | None = None
        # Per account: the credit its last hold here left, less the holds admitted
        # here since; known only while the last answer was a hold taken.
        self._room: dict[int, int] = {}

    async def admit(self, call: ChatCall) -> None:
        principal = call.principal
        if principal is None:
            return  # Only before authentication exists; see app.limits.stage.
        account_id = principal.account_id
        amount = max_cost_micros(call, self.commission_bps)
        lifetime_s = hold_lifetime_s(call.plan)
        if self.leases is not None:
            use = self.leases.use(account_id, amount, lifetime_s)
            if use is not None:
                call.notes[self.name] = use
                return
        hold = self._hold(call, account_id, amount, lifetime_s)
        room = self._room.get(account_id)
        if room is None or room < amount:
            # Unknown, or refused or short last time: no upstream request is started
            # for a call this account may not afford.
            await hold
            return
        # The last hold left room for this one (less what calls admitted here since
        # took): the hold is taken while the upstream is asked (Pipeline.overlap).
        self._room[account_id] = room - amount
        taking = asyncio.ensure_future(hold)
        call.defer(self.name, _answer(taking))

    async def _hold(self, call: ChatCall, account_id: int, amount: int, lifetime_s: int
                    ) -> None:
        """Take the call's hold or raise the 402, re-checking a refusal against a fresh read."""
        balance: AccountBalance | None = None
        for _ in range(ADMIT_ATTEMPTS):
            taken = await self._take(call, account_id, amount, lifetime_s)
            if taken is not None:
                call.notes[self.name] = amount
                self._remember(account_id, taken.room_micros)
                if self.leases is not None and taken.room_micros is not None:
                    # The account's next calls may share a lease taken meanwhile.
                    self.leases.offer(account_id, amount, lifetime_s, taken.room_micros)
                return
            if self.leases is not None and await self.leases.give_back(account_id):
                continue  # This process's own lease held the credit: try again without it.
            balance = await self._balance(account_id)
            if not balance.admits(amount):
                break
        self._remember(account_id, None)
        assert balance is not None
        raise balance.refusal(amount)

    def _remember(self, account_id: int, room_micros: int | None) -> None:
        if room_micros is None:
            self._room.pop(account_id, None)
            return
        if len(self._room) >= ROOM_ACCOUNTS_MAX and account_id not in self._room:
            self._room.clear()  # Simple bound: forgetting only costs one overlap.
        self._room[account_id] = room_micros

    async def settle(self, call: ChatCall) -> None:
        note = call.notes.get(self.name)
        if isinstance(note, LeaseUse):
            await self._settle_on_lease(call, note)
            return
        assert note is None or isinstance(note, int), "ledger notes hold the held amount"
        hold = note
        outcome = call.outcome
        usage = outcome.usage
        if usage is None or outcome.candidate is None or call.principal is None:
            # Nothing was produced: nothing is owed, nothing is recorded.
            if hold is not None:
                await self._release(call)
            return
        assert self.recorder is not None, "ledger used before startup"
        cost = self._cost(call)
        written = await self.recorder.record(self._entry(call, cost, lease_id=None))
        if hold is not None:
            _check_hold(call, hold, cost, written)
        self._charged(call, cost, written)

    async def _settle_on_lease(self, call: ChatCall, use: LeaseUse) -> None:
        """Record the call's usage as a draw on its lease (nothing to write if there is none)."""
        assert self.leases is not None and self.recorder is not None, "used before startup"
        outcome = call.outcome
        drawn: int | None = None
        try:
            if outcome.usage is None or outcome.candidate is None:
                drawn = 0
                return
            cost = self._cost(call)
            entry = self._entry(call, cost, lease_id=use.lease.hold_id)
            written = await self.recorder.record(entry)
            if cost.total_micros > use.reserved_micros:
                log.error("request %s cost %d micro-USD, more than the %d reserved for it; "
                          "recorded anyway", call.request_id, cost.total_micros,
                          use.reserved_micros)
            if not written.lease_short:
                drawn = cost.total_micros
            self._charged(call, cost, written)
        finally:
            self.leases.settled(use, drawn)

    def _cost(self, call: ChatCall) -> Cost:
        candidate, usage = call.outcome.candidate, call.outcome.usage
        assert candidate is not None and usage is not None
        return price_usage(candidate.model.price, usage, self.commission_bps)

    def _entry(self, call: ChatCall, cost: Cost, lease_id: str | None) -> UsageEntry:
        outcome = call.outcome
        candidate, usage, principal = outcome.candidate, outcome.usage, call.principal
        assert candidate is not None and usage is not None and principal is not None
        return UsageEntry(
            request_id=call.request_id,
            account_id=principal.account_id,
            session_jti=principal.session_jti,
            public_model=candidate.model.id,
            provider=candidate.route.provider.name,
            upstream_model=candidate.route.upstream_model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            base_cost_micros=cost.base_micros,
            commission_rate_bps=cost.commission_rate_bps,
            commission_micros=cost.commission_micros,
            total_micros=cost.total_micros,
            status=outcome.status,
            streamed=outcome.streamed,
            usage_source=usage.source,
            latency_ms=_ms(outcome.latency_s),
            time_to_first_chunk_ms=_ms(outcome.time_to_first_chunk_s),
            lease_id=lease_id,
        )

    def _charged(self, call: ChatCall, cost: Cost, written: Written) -> None:
        """What the answer says of a record once written."""
        candidate = call.outcome.candidate
        assert candidate is not None
        if not written.recorded:
            log.error("usage of request %s was already recorded; not charged twice",
                      call.request_id)
            return
        call.usage_extra["cost"] = cost.to_api()
        call.response_headers["X-Tollgate-Cost"] = str(cost.total_micros)
        call.response_headers["X-Tollgate-Cost-Unit"] = COST_UNIT
        self.metrics.spent(candidate.model.id, cost.base_micros, cost.commission_micros)

    async def _take(self, call: ChatCall, account_id: int, amount: int, lifetime_s: int
                    ) -> Taken | None:
        assert self.holds is not None and self.recorder is not None, "used before startup"
        request = HoldRequest(call.request_id, account_id, amount, lifetime_s)
        try:
            # The hold writer retries a failed batch itself; its last failure is a 503.
            return await self.holds.take(request)
        except BaseException:
            # The statement may have committed (a cancellation, an answer lost after
            # the commit): release whatever it took.
            self.recorder.release_soon(call.request_id)
            raise

    async def _balance(self, account_id: int) -> AccountBalance:
        assert self.engine is not None, "ledger used before startup"
        try:
            return await read_balance(self.engine, account_id)
        except ApiError:
            raise
        except Exception as error:
            log.error("reading a balance failed: %s: %s", type(error).__name__, error)
            raise _unavailable() from None

    async def _release(self, call: ChatCall) -> None:
        assert self.recorder is not None, "ledger used before startup"
        try:
            written = await self.recorder.release(call.request_id)
        except ServiceUnavailable:
            # The call is over and owes nothing; its hold only reserves credit until
            # it expires. Not worth failing an answer that is already decided.
            log.warning("hold of request %s not released; it will expire", call.request_id)
            return
        if written.released_micros is None:
            log.warning("request %s had no open hold to release (expired?)", call.request_id)


def _check_hold(call: ChatCall, hold_micros: int, cost: Cost, written: Written) -> None:
    """A completed call is recorded whatever its hold was; a mismatch is logged loudly."""
    if written.released_micros is None and written.recorded:
        log.warning("request %s had no open hold when it was recorded (expired?)",
                    call.request_id)
    if cost.total_micros > hold_micros:
        log.error("request %s cost %d micro-USD, more than its hold of %d; recorded anyway",
                  call.request_id, cost.total_micros, hold_micros)
