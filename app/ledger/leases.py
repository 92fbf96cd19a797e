"""Credit leases: a process reserves a slice of an account's credit once and admits on it.

A hold per call costs a Postgres round trip and a turn at the account row's lock
before the call may go on. A busy account's calls instead share a **lease**: one
hold, taken by the same statement and balance rule as any other
(``app.ledger.holds``), for the cost of many calls. Calls admitted on it reserve
their maximum cost in this process's memory only; each call's usage record draws
its actual total from the lease's hold in the record's own statement
(``app.ledger.recorder``), so the account's totals stay exact at every commit:

    held_micros  = the lease's remaining hold + every other open hold
    a record:      usage += total, lease hold -= total   (in one statement)

so ``usage - paid + held <= credit limit`` holds as it did with per-call holds:
whatever this process admits locally is inside credit the database already
reserved for it.

**Lifetime.** A lease admits calls for ``lease_s`` after it was taken (and only
calls that end before its hold expires), then retires: it gives back what its
in-flight calls cannot use (a shrink) and, when its last call has settled, is
released. A process that dies leaves it to expire like any hold.

**When.** An account whose calls here take holds less than ``lease_s`` apart is
busy: its second such hold starts a lease for the calls after it.

**What it costs the account.** While a lease is open, credit it reserved but has
not spent counts as held: another process can see less room than there is, for
at most ``lease_s``. A lease is therefore taken only where the room is ample (the
account's room after the call's own hold is at least ``LEASE_MIN_CALLS`` calls of
this size, and a lease takes at most ``1 / LEASE_ROOM_SHARE`` of it). Before this
process answers 402 it gives back its own lease's spare credit and tries again, so
one process alone never refuses a call it could serve. Settlement failures and
credit-limit changes reach an open lease's admissions within ``lease_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from app.errors import ServiceUnavailable
from app.ledger.holds import HoldRequest, HoldTaker
from app.ledger.recorder import UsageRecorder, Written
from app.proxy.lease_scale import LeaseScale

log = logging.getLogger(__name__)

# A lease is taken for this many calls of the size of the call that asked for it
# (at first; an account that exhausts its lease before its time gets one twice as
# large next, up to the maximum, and one that used less than half gets half)...
LEASE_CALLS = 32
LEASE_CALLS_MAX = 4096
# ...at most this share of the room the account had (1/4)...
LEASE_ROOM_SHARE = 4
# ...and only when the room holds at least this many such calls.
LEASE_MIN_CALLS = 8
# Prefix of a lease hold's id in the holds table (request ids never start with it).
LEASE_ID_PREFIX = "lease-"


@dataclass(slots=True, eq=False)
class Lease:
    """One lease's books in its process: what it reserved, spent and gave back."""

    hold_id: str
    account_id: int
    amount_micros: int
    # Loop times: new calls until ``admits_until``; every call on it must end
    # (its hold lifetime) before ``expires`` (earlier than the database's expiry).
    admits_until: float
    expires: float
    drawn_micros: int = 0
    reserved_micros: int = 0
    given_back_micros: int = 0
    calls_in_flight: int = 0
    calls_admitted: int = 0
    # The number of calls of its first call's size it was taken for.
    calls_planned: int = LEASE_CALLS
    retired: bool = False

    @property
    def available_micros(self) -> int:
        return (self.amount_micros - self.drawn_micros - self.reserved_micros
                - self.given_back_micros)

    def admits(self, amount_micros: int, lifetime_s: float, now: float) -> bool:
        return (not self.retired and now < self.admits_until
                and now + lifetime_s <= self.expires
                and amount_micros <= self.available_micros)


@dataclass(frozen=True, slots=True)
class LeaseUse:
    """A call admitted on a lease, and the most it may cost (reserved on the lease)."""

    lease: Lease
    reserved_micros: int


def lease_size_micros(amount_micros: int, room_micros: int, calls: int = LEASE_CALLS
                      ) -> int | None:
    """How much to lease for ``calls`` calls of ``amount_micros`` given the account's room;
    None: don't."""
    if amount_micros <= 0 or room_micros < LEASE_MIN_CALLS * amount_micros:
        return None
    return min(room_micros // LEASE_ROOM_SHARE, calls * amount_micros)


class CreditLeases:
    """This process's open leases, one per account at most, and their retirement."""

    def __init__(self, holds: HoldTaker, recorder: UsageRecorder, lease_s: float,
                 on_taken: Callable[[], None] = lambda: None) -> None:
        assert lease_s > 0
        self.on_taken = on_taken
        self.holds = holds
        self.recorder = recorder
        self.lease_s = lease_s
        self._open: dict[int, Lease] = {}
        self._taking: dict[int, asyncio.Task[None]] = {}
        # Per account: writes giving a retired lease's credit back, until committed.
        self._returning: dict[int, set[asyncio.Task[Written]]] = {}
        # Busy accounts (holds here less than lease_s apart) and their leases' sizes.
        self.scale = LeaseScale(LEASE_CALLS, LEASE_CALLS_MAX, lease_s)
        self.leases_asked = 0
        self.leases_taken = 0

    def open_lease(self, account_id: int) -> Lease | None:
        return self._open.get(account_id)

    def use(self, account_id: int, amount_micros: int, lifetime_s: float) -> LeaseUse | None:
        """Admit a call on the account's open lease, if it has room; None: it has none."""
        lease = self._open.get(account_id)
        if lease is None:
            return None
        now = asyncio.get_running_loop().time()
        if not lease.admits(amount_micros, lifetime_s, now):
            if now >= lease.admits_until:
                self._expire(lease)
            elif lease.available_micros < amount_micros:
                # Spent before its time: the next lease is larger, and is taken on
                # the next hold (the account is busy).
                self.scale.spent_early(account_id, lease.calls_planned)
                self.scale.busy(account_id, now)
                self._retire(lease)
            return None
        lease.reserved_micros += amount_micros
        lease.calls_in_flight += 1
        lease.calls_admitted += 1
        return LeaseUse(lease, amount_micros)

    def offer(self, account_id: int, amount_micros: int, lifetime_s: int,
              room_micros: int) -> None:
        """A call took a hold of its own: lease for the account's next calls if it is busy.

        Busy: its previous hold here was less than ``lease_s`` ago (a lone call never
        costs a lease's two extra writes). ``room_micros`` is what the account had left
        after this call's hold.
        """
        if not self.scale.admitted(account_id, asyncio.get_running_loop().time()):
            return
        calls = self.scale.calls(account_id)
        size = lease_size_micros(amount_micros, room_micros, calls)
        if size is None or account_id in self._taking or account_id in self._open:
            return
        self.leases_asked += 1
        task = asyncio.ensure_future(self._take(account_id, size, calls, lifetime_s))
        self._taking[account_id] = task
        task.add_done_callback(lambda _: self._taking.pop(account_id, None))

    async def offers_answered(self) -> None:
        """Wait until every lease being taken is taken or refused."""
        await asyncio.gather(*self._taking.values(), return_exceptions=True)

    async def _take(self, account_id: int, size: int, calls: int, call_lifetime_s: int
                    ) -> None:
        hold_id = f"{LEASE_ID_PREFIX}{uuid.uuid4().hex}"
        # The hold outlives the last call it may admit (one starting as admission ends).
        lifetime_s = int(self.lease_s) + 1 + call_lifetime_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            taken = await self.holds.take(HoldRequest(hold_id, account_id, size, lifetime_s))
        except ServiceUnavailable:
            return  # Calls go on with holds of their own.
        except BaseException:
            self.recorder.release_soon(hold_id)
            raise
        if taken is None:
            return  # The room went to other calls meanwhile.
        lease = Lease(hold_id, account_id, size, admits_until=started + self.lease_s,
                      expires=started + lifetime_s, calls_planned=calls)
        self.leases_taken += 1
        self.on_taken()
        previous = self._open.get(account_id)
        if previous is not None:
            self._retire(previous)
        self._open[account_id] = lease
        loop.call_at(lease.admits_until, self._expire, lease)

    def settled(self, use: LeaseUse, drawn_micros: int | None) -> None:
        """A call on the lease is over: it drew ``drawn_micros`` (None: the draw fell short)."""
        lease = use.lease
        assert lease.calls_in_flight > 0 and lease.reserved_micros >= use.reserved_micros
        lease.calls_in_flight -= 1
        lease.reserved_micros -= use.reserved_micros
        if drawn_micros is None:
            # The hold is not what this process counted: use it no more.
            self._retire(lease)
        else:
            lease.drawn_micros += drawn_micros
        if lease.retired and lease.calls_in_flight == 0:
            self._release(lease)

    async def give_back(self, account_id: int) -> bool:
        """Retire the account's lease and wait until its spare credit is back in the account.

        False: this process held no spare credit of the account's (nothing changed).
        """
        taking = self._taking.get(account_id)
        if taking is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(taking)
        lease = self._open.get(account_id)
        if lease is not None:
            self._retire(lease)
        returning = self._returning.get(account_id)
        if not returning:
            return lease is not None
        await asyncio.gather(*returning, return_exceptions=True)
        return True

    def _expire(self, lease: Lease) -> None:
        """The lease's time is up (its timer)."""
        if not lease.retired:
            self.scale.expired(lease.account_id, lease.calls_planned, lease.calls_admitted)
        self._retire(lease)

    def _retire(self, lease: Lease) -> None:
        """No more calls on the lease: give back what its calls in flight cannot use."""
        if lease.retired:
            return
        lease.retired = True
        if self._open.get(lease.account_id) is lease:
            del self._open[lease.account_id]
        if lease.calls_in_flight == 0:
            self._release(lease)
            return
        spare = lease.available_micros
        if spare > 0:
            lease.given_back_micros += spare
            self._return(lease, self.recorder.shrink(lease.hold_id, spare))

    def _release(self, lease: Lease) -> None:
        self._return(lease, self.recorder.release(lease.hold_id))

    def _return(self, lease: Lease, write: Coroutine[Any, Any, Written]) -> None:
        """Send a write giving credit back; ``give_back`` can wait for it."""
        task = asyncio.ensure_future(write)
        returning = self._returning.setdefault(lease.account_id, set())
        returning.add(task)

        def done(task: asyncio.Task[Written]) -> None:
            returning.discard(task)
            if not returning and self._returning.get(lease.account_id) is returning:
                del self._returning[lease.account_id]
            if not task.cancelled() and task.exception() is not None:
                # Left to expire with its hold; the account only waits longer for it.
                log.warning("lease %s: credit not given back: %s", lease.hold_id,
                            task.exception())

        task.add_done_callback(done)

    async def retire_all(self) -> None:
        """Retire every lease now (at shutdown): each is released once its calls settled."""
        for task in list(self._taking.values()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for lease in list(self._open.values()):
            self._retire(lease)
        for returning in list(self._returning.values()):
            await asyncio.gather(*returning, return_exceptions=True)
