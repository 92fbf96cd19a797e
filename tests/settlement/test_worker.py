"""The settlement worker on the test anvil and the session's Postgres: collections confirm
and are paid once, due accounts are chosen by threshold and age, policies bound the amount,
and a revert fails the collection and cuts the account's credit."""

from __future__ import annotations

import asyncio
import datetime as dt

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.ledger.balance import read_balance
from app.settlement.worker import SettlementPolicy
from app.storage.database import create_engine
from app.storage.tables import accounts
from tests.conftest import DevChain
from tests.identity.smart_accounts import SmartAccounts
from tests.settlement.conftest import (
    Payer,
    account_row,
    add_usage,
    collected_on_chain,
    grant_with_cap,
    make_account_row,
    make_worker,
    new_payer,
    settled_events,
    settlement_rows,
    store_voucher,
    usdc_balance,
    voucher_deadline,
)

LONG_AGO = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


async def indebted_payer(engine: AsyncEngine, dev_chain: DevChain,
                         smart_accounts: SmartAccounts, *, debt_micros: int,
                         voucher_micros: int = 5_000_000) -> Payer:
    payer = await new_payer(smart_accounts)
    account_id = await make_account_row(engine, payer)
    await store_voucher(engine, dev_chain, payer, voucher_micros,
                        await voucher_deadline(smart_accounts))
    await add_usage(engine, account_id, debt_micros)
    return payer


async def assert_collected_once(engine: AsyncEngine, dev_chain: DevChain, payer: Payer,
                                amount_micros: int) -> None:
    """One confirmed row of ``amount_micros``, one Settled event naming it, and the ledger
    and the chain agreeing on what was collected."""
    assert payer.account_id is not None
    rows = await settlement_rows(engine, payer.account_id)
    assert [row["status"] for row in rows] == ["confirmed"], rows
    row = rows[0]
    assert row["amount_micros"] == amount_micros
    events = await settled_events(dev_chain, row["reference"])
    assert len(events) == 1
    assert events[0]["transactionHash"].to_0x_hex() == row["tx_hash"]
    assert await collected_on_chain(dev_chain, payer) == amount_micros
    assert await usdc_balance(dev_chain, payer.account) == 10_000_000 - amount_micros
    account = await account_row(engine, payer.account_id)
    assert account["paid_micros"] == amount_micros
    assert row["cumulative_micros"] == amount_micros
    assert row["session_key"] == payer.key.address.lower()


async def test_a_due_account_is_collected_and_paid_once(
    engine: AsyncEngine, dev_chain: DevChain, smart_accounts: SmartAccounts,
) -> None:
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=250_000)
    assert payer.account_id is not None
    # A failed earlier settlement is retried because the voucher is newer, and the
    # confirmation clears the flag.
    async with engine.begin() as connection:
        await connection.execute(update(accounts).where(accounts.c.id == payer.account_id)
                                 .values(settlement_failed_at=LONG_AGO))
    report = await make_worker(engine, dev_chain).run_pass()
    assert report.ok, report
    await assert_collected_once(engine, dev_chain, payer, 250_000)
    balance = await read_balance(engine, payer.account_id)
    assert balance.balance_micros == 0 and not balance.settlement_failed

    # Nothing is owed any more: a second pass sends nothing.
    await make_worker(engine, dev_chain).run_pass()
    await assert_collected_once(engine, dev_chain, payer, 250_000)


async def test_two_passes_at_once_collect_once(
    engine: AsyncEngine, postgres_url: str, dev_chain: DevChain, smart_accounts: SmartAccounts,
) -> None:
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=300_000)
    # Two engines, as two processes would have.
    other = create_engine(postgres_url)
    try:
        reports = await asyncio.gather(make_worker(engine, dev_chain).run_pass(),
                                       make_worker(other, dev_chain).run_pass())
    finally:
        await other.dispose()
    assert all(report.ok for report in reports), reports
    await assert_collected_once(engine, dev_chain, payer, 300_000)


async def test_debt_is_due_by_threshold_or_by_age(
    engine: AsyncEngine, dev_chain: DevChain, smart_accounts: SmartAccounts,
) -> None:
    policy = SettlementPolicy(threshold_micros=1_000_000, age_s=3600, minimum_micros=10_000,
                              confirmation_wait_s=10)
    old = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=0)
    young = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=0)
    tiny = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=0)
    assert old.account_id and young.account_id and tiny.account_id
    # The old account's oldest uncovered usage is two hours old; the young one's is new;
    # the tiny one's is old but under the minimum.
    await add_usage(engine, old.account_id, 30_000, age_s=7200)
    await add_usage(engine, old.account_id, 20_000)
    await add_usage(engine, young.account_id, 500_000)
    await add_usage(engine, tiny.account_id, 5_000, age_s=7200)
    await make_worker(engine, dev_chain, policy=policy).run_pass()
    await assert_collected_once(engine, dev_chain, old, 50_000)
    assert await settlement_rows(engine, young.account_id) == []
    assert await settlement_rows(engine, tiny.account_id) == []

    # Over the threshold, age does not matter.
    await add_usage(engine, young.account_id, 600_000)
    await make_worker(engine, dev_chain, policy=policy).run_pass()
    await assert_collected_once(engine, dev_chain, young, 1_100_000)


async def test_the_voucher_and_the_policy_bound_the_amount_then_the_cap_fails_it(
    engine: AsyncEngine, dev_chain: DevChain, smart_accounts: SmartAccounts,
) -> None:
    # The voucher allows 400k in all; the debt is 900k.
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=900_000,
                                 voucher_micros=400_000)
    assert payer.account_id is not None
    await make_worker(engine, dev_chain).run_pass()
    await assert_collected_once(engine, dev_chain, payer, 400_000)

    # A higher voucher, but the key's policy now allows 150k a day: 150k is collected.
    await grant_with_cap(smart_accounts, payer, 150_000)
    await store_voucher(engine, dev_chain, payer, 5_000_000,
                        await voucher_deadline(smart_accounts))
    await make_worker(engine, dev_chain).run_pass()
    rows = await settlement_rows(engine, payer.account_id)
    assert [(r["status"], r["amount_micros"], r["cumulative_micros"]) for r in rows] == [
        ("confirmed", 400_000, 400_000), ("confirmed", 150_000, 550_000)]
    assert await collected_on_chain(dev_chain, payer) == 550_000

    # The period's cap is spent: the collection reverts, fails, and cuts the credit.
    report = await make_worker(engine, dev_chain).run_pass()
    rows = await settlement_rows(engine, payer.account_id)
    assert [r["status"] for r in rows] == ["confirmed", "confirmed", "failed"]
    assert rows[2]["amount_micros"] == 350_000
    assert "SessionCapExceeded" in rows[2]["failure_reason"]
    assert any("SessionCapExceeded" in reason for reason in report.failures)
    assert not report.ok
    balance = await read_balance(engine, payer.account_id)
    assert balance.settlement_failed and balance.effective_credit_limit_micros == 0
    assert balance.balance_micros == 350_000
    assert await collected_on_chain(dev_chain, payer) == 550_000

    # Without a newer voucher the failed account is left alone.
    await make_worker(engine, dev_chain).run_pass()
    assert len(await settlement_rows(engine, payer.account_id)) == 3


async def test_a_revoked_key_fails_the_collection(
    engine: AsyncEngine, dev_chain: DevChain, smart_accounts: SmartAccounts,
) -> None:
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=200_000)
    assert payer.account_id is not None
    await smart_accounts.revoke(payer.owner, payer.account, payer.key.address)
    report = await make_worker(engine, dev_chain).run_pass()
    rows = await settlement_rows(engine, payer.account_id)
    assert [r["status"] for r in rows] == ["failed"]
    assert "UnknownSessionKey" in rows[0]["failure_reason"]
    assert rows[0]["tx_hash"] is None, "the estimate reverted: nothing was sent"
    assert report.failed >= 1
    account = await account_row(engine, payer.account_id)
    assert account["settlement_failed_at"] is not None and account["paid_micros"] == 0
    assert await collected_on_chain(dev_chain, payer) == 0


async def test_used_up_vouchers_are_skipped_not_failed(
    engine: AsyncEngine, dev_chain: DevChain, smart_accounts: SmartAccounts,
) -> None:
    """Used-up vouchers are skipped, not failed: the credit limit still bounds the debt."""
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=300_000,
                                 voucher_micros=300_000)
    assert payer.account_id is not None
    await make_worker(engine, dev_chain).run_pass()
    await add_usage(engine, payer.account_id, 200_000)
    report = await make_worker(engine, dev_chain).run_pass()
    assert report.ok
    assert len(await settlement_rows(engine, payer.account_id)) == 1
    account = await account_row(engine, payer.account_id)
    assert account["settlement_failed_at"] is None
