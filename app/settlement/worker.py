"""The settlement worker: collects what accounts owe through the settlement contract.

One pass (``SettlementWorker.run_pass``):

1. Every pending collection of this deployment is driven on (restart recovery: rows left by a
   worker that stopped, crashed or was killed mid-flight, here or in another process).
2. Accounts that are due (``app.settlement.store``) get a new collection: the amount is
   ``min(debt, best voucher's total - collected on chain under its key)``, lowered to what
   the account's session policy still allows this period when that is less but not zero;
   the reference is derived (``app.settlement.reference``); the pending row is committed
   before anything is sent.
3. Each collection is driven: under its row lock, the chain is asked what became of it,

   - its ``Settled`` event exists (in the stored transaction's receipt, or found by its
     reference) and is ``confirmations`` blocks deep: confirmed, with the event's
     transaction hash, and the amount paid, in one statement;
   - its transaction is mined but reverted (cap exceeded, voucher expired, key revoked, ...)
     or the call reverts when it is estimated: failed with the revert's name, and the
     account's credit is cut to prepaid until it pays (x402) or posts a newer voucher;
   - its transaction is waiting in the node's pool: left as it is;
   - there is no transaction and the reference is unused (never sent, or dropped): the same
     collection is sent again, and its hash stored, before the lock is released.

   then the worker waits for the transaction to be deep enough and looks again.

Why this never collects twice nor loses a collection: the reference is fixed when the row is
written and the contract accepts a reference once, so however often a row is sent, at most one
transaction collects; a row is confirmed from the chain's own event, whichever transaction
emitted it and even if its hash was never stored; a row is failed only while its reference is
unused on chain and no transaction of the operator is still waiting to be mined (one might be
a lost copy of this collection), so a failed row can never turn into money later. A revert's
reason is never the proof: a resent copy is refused because the first one collected. Being
killed at any point leaves a pending row that the next pass, here or elsewhere, finishes.

Decisions where the issue is silent:

- ``confirmations`` has ``ChainClient.wait_for_receipt``'s meaning: the block holding the
  transaction is that many blocks deep (1 = mined); 0 is taken as 1, since nothing counts
  before it is mined.
- Vouchers whose deadline is less than ``deadline_margin_s`` away on the chain's clock are not
  used, so a collection is not sent to expire in the pool. An account with no usable voucher,
  or whose vouchers are used up, is not collected and not marked failed: its credit limit
  still bounds what it can owe, and its agent can post a higher voucher.
- When the policy allows nothing at all now (key revoked or expired, period spent), the
  collection is still attempted for the full amount, so the revert's reason is recorded and
  the account's credit is cut, as the issue asks for a failed settlement.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field

from eth_utils import to_checksum_address
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.chain.errors import ChainError, ConfirmationTimeout, TransactionReverted
from app.chain.operator import OperatorWallet
from app.config.settings import Settings
from app.settlement.contract import (
    METHOD_SESSION_DEBIT,
    ChainHead,
    SettledEvent,
    SettlementContract,
)
from app.settlement.reference import settlement_reference
from app.settlement.store import DueAccount, PendingSettlement, SettlementStore
from app.settlement.vouchers import StoredVoucher, VoucherStore

log = logging.getLogger(__name__)

# Steps one drive may take (send, wait, look again, ...) before it leaves the row to the
# next pass: a bound, not a number any normal collection gets near.
DRIVE_STEPS_MAX = 6


@dataclass(frozen=True, slots=True)
class SettlementPolicy:
    """When to collect and how much work one pass may do. Amounts in micro-USD."""

    # Collect as soon as the debt reaches this.
    threshold_micros: int = 1_000_000
    # ... or when some of it is older than this, if it is at least `minimum_micros`.
    age_s: int = 86_400
    minimum_micros: int = 10_000
    # Vouchers closer than this to their deadline (chain time) are not used.
    deadline_margin_s: int = 300
    accounts_per_pass_max: int = 100
    pending_per_pass_max: int = 100
    vouchers_per_account_max: int = 4
    # Collections driven at once (each holds a database connection while it takes a step).
    concurrent_max: int = 4
    # How long one drive waits for its transaction to be deep enough before leaving it to
    # the next pass; None: do not wait at all.
    confirmation_wait_s: float | None = 120.0

    def __post_init__(self) -> None:
        assert 0 < self.minimum_micros <= self.threshold_micros
        assert self.age_s >= 0 and self.deadline_margin_s >= 0
        assert min(self.accounts_per_pass_max, self.pending_per_pass_max,
                   self.vouchers_per_account_max, self.concurrent_max) >= 1
        assert self.confirmation_wait_s is None or self.confirmation_wait_s > 0


DEFAULT_POLICY = SettlementPolicy()


def policy_from_settings(settings: Settings) -> SettlementPolicy:
    return SettlementPolicy(threshold_micros=settings.settlement_threshold_micros,
                            age_s=settings.settlement_max_age_s,
                            minimum_micros=settings.settlement_minimum_micros)


class Outcome(enum.Enum):
    """What one step (or one drive) left a collection in."""

    CONFIRMED = "confirmed"
    FAILED = "failed"
    # Still pending: sent and not deep enough, or waiting for the chain to say more.
    PENDING = "pending"
    # Another worker holds the row's lock, or resolved it first.
    ELSEWHERE = "elsewhere"
    # The chain could not be asked; the row is untouched and the next pass retries.
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Step:
    outcome: Outcome
    tx_hash: str | None = None
    reason: str | None = None


@dataclass
class PassReport:
    """What one pass did."""

    opened: int = 0
    confirmed: int = 0
    failed: int = 0
    pending: int = 0
    elsewhere: int = 0
    errors: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing failed and the chain answered every question."""
        return self.failed == 0 and self.errors == 0

    def count(self, step: Step) -> None:
        if step.outcome is Outcome.CONFIRMED:
            self.confirmed += 1
        elif step.outcome is Outcome.FAILED:
            self.failed += 1
            self.failures.append(step.reason or "failed")
        elif step.outcome is Outcome.PENDING:
            self.pending += 1
        elif step.outcome is Outcome.ELSEWHERE:
            self.elsewhere += 1
        else:
            self.errors += 1

    def summary(self) -> str:
        return (f"opened {self.opened}, confirmed {self.confirmed}, failed {self.failed},"
                f" pending {self.pending}, elsewhere {self.elsewhere}, errors {self.errors}")


@dataclass(frozen=True, slots=True)
class _Settled:
    event: SettledEvent


@dataclass(frozen=True, slots=True)
class _Reverted:
    reason: str
    tx_hash: str
    block_number: int


@dataclass(frozen=True, slots=True)
class _InFlight:
    tx_hash: str | None


@dataclass(frozen=True, slots=True)
class _Absent:
    pass


_Observation = _Settled | _Reverted | _InFlight | _Absent


class SettlementWorker:
    """Collects from the accounts of one settlement deployment; any number may run at once."""

    def __init__(self, engine: AsyncEngine, contract: SettlementContract,
                 operator: OperatorWallet, vouchers: VoucherStore, *, confirmations: int,
                 policy: SettlementPolicy = DEFAULT_POLICY) -> None:
        assert vouchers.domain.settlement.lower() == contract.address.lower()
        self.engine = engine
        self.contract = contract
        self.client = contract.client
        self.operator = operator
        self.vouchers = vouchers
        self.store = SettlementStore(engine, chain_id=vouchers.domain.chain_id,
                                     settlement=contract.address)
        self.depth = max(1, confirmations)
        self.policy = policy

    async def run_pass(self) -> PassReport:
        """Finish what is in flight, open what is due, and drive all of it."""
        report = PassReport()
        head = await self.contract.head()
        ids = await self.store.pending_ids(self.policy.pending_per_pass_max)
        opened, open_errors = await self.open_collections(head)
        report.opened, report.errors = len(opened), open_errors
        ids += [i for i in opened if i not in ids]
        gate = asyncio.Semaphore(self.policy.concurrent_max)

        async def drive(settlement_id: int) -> Step:
            async with gate:
                return await self.drive(settlement_id)

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(drive(i)) for i in ids]
        for task in tasks:
            report.count(task.result())
        return report

    async def open_collections(self, head: ChainHead) -> tuple[list[int], int]:
        """Write a pending row for every due account; (their ids, accounts the chain could
        not be asked about)."""
        due = await self.store.due_accounts(
            threshold_micros=self.policy.threshold_micros,
            minimum_micros=self.policy.minimum_micros, age_s=self.policy.age_s,
            usable_after_s=head.timestamp_s + self.policy.deadline_margin_s,
            limit=self.policy.accounts_per_pass_max)
        opened: list[int] = []
        errors = 0
        for account in due:
            try:
                settlement_id = await self._open(account, head)
            except ChainError as error:
                log.warning("settlement of account %s not opened: %s", account.account_id,
                            error)
                errors += 1
                continue
            if settlement_id is not None:
                opened.append(settlement_id)
        return opened, errors

    async def _open(self, account: DueAccount, head: ChainHead) -> int | None:
        async with self.engine.connect() as connection:
            usable = await self.vouchers.usable(
                connection, account.account_id,
                usable_after_s=head.timestamp_s + self.policy.deadline_margin_s,
                limit=self.policy.vouchers_per_account_max)
        best: tuple[StoredVoucher, int] | None = None
        for voucher in usable:
            collected = await self.contract.collected(account.smart_account, voucher.session_key)
            headroom = voucher.cumulative_micros - collected
            if headroom > 0 and (best is None or headroom > best[0].cumulative_micros - best[1]):
                best = (voucher, collected)
        if best is None:
            log.debug("account %s owes %s micro-USD but its vouchers are used up",
                     account.account_id, account.debt_micros)
            return None
        voucher, collected = best
        amount = min(account.debt_micros, voucher.cumulative_micros - collected)
        available = await self.contract.session_available(account.smart_account,
                                                          voucher.session_key)
        if available is not None and 0 < available < amount:
            amount = available
        cumulative = collected + amount
        attempt = await self.store.failed_attempts(account.account_id, voucher.session_key,
                                                   cumulative)
        reference = settlement_reference(
            chain_id=self.vouchers.domain.chain_id, settlement=self.contract.address,
            account=account.smart_account, session_key=voucher.session_key,
            cumulative_micros=cumulative, attempt=attempt)
        return await self.store.open(reference=reference, account_id=account.account_id,
                                     amount_micros=amount, session_key=voucher.session_key,
                                     cumulative_micros=cumulative)

    async def drive(self, settlement_id: int) -> Step:
        """Take steps until the collection is resolved, or waiting on something slow."""
        step = Step(Outcome.PENDING)
        for _ in range(DRIVE_STEPS_MAX):
            try:
                step = await self.advance(settlement_id)
            except ChainError as error:
                log.warning("settlement %s: chain unavailable: %s", settlement_id, error)
                return Step(Outcome.ERROR, reason=str(error))
            wait_s = self.policy.confirmation_wait_s
            if step.outcome is not Outcome.PENDING or step.tx_hash is None or wait_s is None:
                return step
            try:
                await self.client.wait_for_receipt(step.tx_hash, confirmations=self.depth,
                                                   timeout_s=wait_s)
            except TransactionReverted:
                pass  # the next step records why
            except ConfirmationTimeout:
                return step
            except ChainError as error:
                log.warning("settlement %s: chain unavailable: %s", settlement_id, error)
                return Step(Outcome.ERROR, tx_hash=step.tx_hash, reason=str(error))
        return step

    async def advance(self, settlement_id: int) -> Step:
        """One step of one collection, under its row lock (see the module docstring)."""
        async with self.engine.begin() as connection:
            settlement = await self.store.claim(connection, settlement_id)
            if settlement is None:
                status = await self.store.status(settlement_id)
                return Step(Outcome.ELSEWHERE, reason=status)
            head = await self.contract.head()
            seen = await self._observe(settlement, head)
            if isinstance(seen, _Settled):
                event = seen.event
                if head.number - event.block_number + 1 < self.depth:
                    return Step(Outcome.PENDING, tx_hash=event.tx_hash)
                _check_event(settlement, event)
                await self.store.confirm(connection, settlement, event.tx_hash)
                log.info("settlement %s confirmed: %s micro-USD from account %s in %s",
                         settlement.reference, settlement.amount_micros,
                         settlement.account_id, event.tx_hash)
                return Step(Outcome.CONFIRMED, tx_hash=event.tx_hash)
            if isinstance(seen, _Reverted):
                if head.number - seen.block_number + 1 < self.depth:
                    return Step(Outcome.PENDING, tx_hash=seen.tx_hash)
                return await self._fail(connection, settlement,
                                        f"{seen.reason} (transaction {seen.tx_hash} reverted)")
            if isinstance(seen, _InFlight):
                return Step(Outcome.PENDING, tx_hash=seen.tx_hash)
            return await self._send(connection, settlement)

    async def _observe(self, settlement: PendingSettlement, head: ChainHead) -> _Observation:
        """What became of the collection on chain.

        The reference decides, not a receipt: a reverted transaction of this row may be a
        second copy refused because the first one collected (and the reason a replay gives
        for a revert is best effort), so a revert counts only while the reference is unused.
        """
        reverted_block: int | None = None
        if settlement.tx_hash is not None:
            receipt = await self.client.receipt(settlement.tx_hash)
            if receipt is not None and receipt["status"] == 1:
                event = self.contract.settled_in(receipt, settlement.reference)
                assert event is not None, "a successful collect emits Settled with its ref"
                return _Settled(event)
            if receipt is not None:
                reverted_block = int(receipt["blockNumber"])
            elif await self.contract.transaction_known(settlement.tx_hash):
                return _InFlight(settlement.tx_hash)
        if await self.contract.reference_used(settlement.reference):
            event = await self.contract.find_settled(settlement.reference, head)
            # Used but not yet visible to the log index: look again on the next step.
            return _InFlight(None) if event is None else _Settled(event)
        if reverted_block is not None:
            assert settlement.tx_hash is not None
            reason = await self._revert_reason(settlement.tx_hash)
            return _Reverted(reason, settlement.tx_hash, reverted_block)
        return _Absent()

    async def _revert_reason(self, tx_hash: str) -> str:
        try:
            await self.client.wait_for_receipt(tx_hash, confirmations=1,
                                               timeout_s=self.client.call_timeout_s)
        except TransactionReverted as reverted:
            return reverted.error_name or "reverted without a known error"
        raise AssertionError(f"transaction {tx_hash} has a failed receipt but did not revert")

    async def _send(self, connection: AsyncConnection, settlement: PendingSettlement) -> Step:
        """Send the collection (again) and store its hash before the row lock is released."""
        voucher = await self.vouchers.for_key(connection, settlement.account_id,
                                              settlement.session_key)
        assert voucher is not None, "pending rows are only driven where their voucher is"
        call = self.contract.collect(
            account=settlement.smart_account, session_key=settlement.session_key,
            amount_micros=settlement.amount_micros, cumulative_micros=voucher.cumulative_micros,
            deadline_s=voucher.deadline_s, reference=settlement.reference,
            signature=voucher.signature)
        try:
            sent = await self.operator.transact(call)
        except TransactionReverted as reverted:
            # Gas estimation simulates the call: a revert here sent nothing.
            # ReferenceAlreadyUsed (a copy was mined meanwhile) is no failure: _fail checks.
            reason = reverted.error_name or "reverted without a known error"
            return await self._fail(connection, settlement, f"{reason} (at estimation)")
        tx_hash = sent.to_0x_hex().lower()
        await self.store.record_sent(connection, settlement.id, tx_hash)
        log.info("settlement %s sent: %s micro-USD from account %s in %s",
                 settlement.reference, settlement.amount_micros, settlement.account_id, tx_hash)
        return Step(Outcome.PENDING, tx_hash=tx_hash)

    async def _fail(self, connection: AsyncConnection, settlement: PendingSettlement,
                    reason: str) -> Step:
        if await self.contract.reference_used(settlement.reference):
            return Step(Outcome.PENDING)  # it was collected after all: the next step finds it
        if not await self._operator_idle():
            # A transaction of ours still waits to be mined; it may be a lost copy of this
            # collection, so failing the row now could later contradict the chain.
            return Step(Outcome.PENDING, reason=reason)
        await self.store.fail(connection, settlement, reason)
        log.warning("settlement %s of account %s failed: %s", settlement.reference,
                    settlement.account_id, reason)
        return Step(Outcome.FAILED, reason=reason)

    async def _operator_idle(self) -> bool:
        """Whether none of the operator's transactions is waiting to be mined."""
        eth = self.client.w3.eth
        address = to_checksum_address(self.operator.address)
        mined = await self.client.rpc(eth.get_transaction_count(address, "latest"))
        sent = await self.client.rpc(eth.get_transaction_count(address, "pending"))
        return int(sent) <= int(mined)


def _check_event(settlement: PendingSettlement, event: SettledEvent) -> None:
    """A reference names one collection: its event must be exactly the row. Anything else is
    a bug (or a reference collision), never an operating error."""
    assert event.reference == settlement.reference.lower()
    assert event.amount_micros == settlement.amount_micros, (
        f"settlement {settlement.reference}: the chain collected {event.amount_micros},"
        f" the row says {settlement.amount_micros}")
    assert event.payer == settlement.smart_account.lower()
    assert event.method == METHOD_SESSION_DEBIT
