"""Reconciliation on a real ledger (Postgres) and a real chain (anvil), each the test's own."""

from __future__ import annotations

from typing import Any

import pytest

from app.chain.errors import RpcError
from app.reconcile.report import Category, Check, Finding, Report
from tests.reconcile.world import (
    World,
    authorize_transfer,
    execute,
    funded_payer,
    new_account,
    new_reference,
    paid_on_chain,
    record_payment,
    transfer_directly,
)


def only(report: Report, category: Category) -> list[Finding]:
    return [finding for finding in report.findings if finding.category is category]


async def test_a_payment_settled_with_its_row_is_matched(world: World) -> None:
    payer, reference, tx_hash = await paid_on_chain(world, 2_500_000)
    account_id = await new_account(world.engine, payer.address)
    await record_payment(world.engine, account_id=account_id, reference=reference,
                         amount=2_500_000, payer=payer.address, tx_hash=tx_hash)

    report = await world.report()

    assert report.reconciles, report
    (finding,) = report.findings
    assert finding.category is Category.MATCHED
    assert (finding.reference, finding.account_id, finding.chain_tx_hash) == (
        reference, account_id, tx_hash)
    assert finding.ledger_amount_micros == finding.chain_amount_micros == 2_500_000
    assert report.breaches == ()
    # Without a start block, the scan starts where the settlement contract was deployed.
    assert report.chain is not None and report.chain.receipts_read == 0
    assert 0 < report.chain.from_block <= report.chain.to_block


async def test_a_tampered_amount_and_a_payment_missing_from_the_ledger(world: World) -> None:
    payer, reference, tx_hash = await paid_on_chain(world, 1_000_000)
    account_id = await new_account(world.engine, payer.address)
    await record_payment(world.engine, account_id=account_id, reference=reference,
                         amount=1_000_000, payer=payer.address, tx_hash=tx_hash)
    _, unknown_reference, unknown_tx = await paid_on_chain(world, 700_000)
    await execute(world.engine, "UPDATE payments SET amount_micros = 1500000"
                  " WHERE reference = :reference", reference=reference)

    report = await world.report()

    assert not report.reconciles
    (mismatch,) = only(report, Category.AMOUNT_MISMATCH)
    assert (mismatch.reference, mismatch.ledger_amount_micros,
            mismatch.chain_amount_micros) == (reference, 1_500_000, 1_000_000)
    assert "amount: ledger 1500000, chain 1000000" in mismatch.detail
    (missing,) = only(report, Category.MISSING_IN_LEDGER)
    assert (missing.source, missing.reference, missing.chain_tx_hash,
            missing.chain_amount_micros) == ("settled_event", unknown_reference, unknown_tx,
                                             700_000)
    # The tampered row no longer adds up to what the account was credited.
    (breach,) = report.breaches
    assert (breach.check, breach.account_id, breach.recorded_micros,
            breach.expected_micros) == (Check.PAID_TOTAL, account_id, 1_000_000, 1_500_000)


async def test_a_tampered_tx_hash_is_a_mismatch(world: World) -> None:
    payer, reference, tx_hash = await paid_on_chain(world, 1_000_000)
    account_id = await new_account(world.engine, payer.address)
    await record_payment(world.engine, account_id=account_id, reference=reference,
                         amount=1_000_000, payer=payer.address, tx_hash="0x" + "ab" * 32)

    (finding,) = (await world.report()).findings

    assert finding.category is Category.AMOUNT_MISMATCH
    assert f"tx hash: ledger 0x{'ab' * 32}, chain {tx_hash}" in finding.detail


async def test_a_confirmed_row_with_nothing_on_chain_is_missing_on_chain(world: World) -> None:
    account_id = await new_account(world.engine)
    reference = new_reference()
    await record_payment(world.engine, account_id=account_id, reference=reference,
                         amount=300_000, payer="0x" + "11" * 20, tx_hash="0x" + "cd" * 32)

    report = await world.report()

    (finding,) = report.findings
    assert (finding.category, finding.reference, finding.status) == (
        Category.MISSING_ON_CHAIN, reference, "confirmed")
    # Its transaction was not in the scanned blocks, so its receipt was asked for: none.
    assert report.chain is not None and report.chain.receipts_read == 1
    assert not report.reconciles


async def test_pending_and_failed_rows_are_not_problems(world: World) -> None:
    account_id = await new_account(world.engine)
    pending, failed = new_reference(), new_reference()
    for reference, status in ((pending, "pending"), (failed, "failed")):
        await record_payment(world.engine, account_id=account_id, reference=reference,
                             amount=100, payer="0x" + "22" * 20, tx_hash=None, status=status)

    report = await world.report()

    assert {(f.reference, f.category) for f in report.findings} == {
        (pending, Category.PENDING), (failed, Category.FAILED)}
    assert report.reconciles


async def test_a_pending_row_whose_payment_is_mined_is_still_pending(world: World) -> None:
    payer, reference, tx_hash = await paid_on_chain(world, 400_000)
    account_id = await new_account(world.engine, payer.address)
    await record_payment(world.engine, account_id=account_id, reference=reference,
                         amount=400_000, payer=payer.address, tx_hash=tx_hash, status="pending")

    (finding,) = (await world.report()).findings

    assert finding.category is Category.PENDING
    assert "not confirmed in the ledger yet" in finding.detail


async def test_a_facilitator_payment_is_matched_by_its_token_transfer(world: World) -> None:
    payer = await funded_payer(world, 900_000)
    tx_hash = await transfer_directly(world, authorize_transfer(world, payer, 900_000))
    account_id = await new_account(world.engine, payer.address)
    reference = new_reference()
    await record_payment(world.engine, account_id=account_id, reference=reference,
                         amount=900_000, payer=payer.address, tx_hash=tx_hash,
                         method="facilitator")

    report = await world.report()

    (finding,) = report.findings
    assert (finding.category, finding.reference, finding.chain_tx_hash) == (
        Category.MATCHED, reference, tx_hash)
    assert "token transfer" in finding.detail
    assert report.reconciles


async def test_a_transfer_no_row_explains_is_missing_in_ledger(world: World) -> None:
    payer = await funded_payer(world, 250_000)
    tx_hash = await transfer_directly(world, authorize_transfer(world, payer, 250_000))

    (finding,) = (await world.report()).findings

    assert (finding.category, finding.source, finding.chain_tx_hash,
            finding.chain_amount_micros) == (Category.MISSING_IN_LEDGER, "token_transfer",
                                             tx_hash, 250_000)
    assert payer.address.lower() in finding.detail


async def test_rows_outside_the_scanned_blocks_are_read_from_their_receipts(
    world: World,
) -> None:
    payer, reference, tx_hash = await paid_on_chain(world, 600_000)
    account_id = await new_account(world.engine, payer.address)
    await record_payment(world.engine, account_id=account_id, reference=reference,
                         amount=600_000, payer=payer.address, tx_hash=tx_hash)
    await funded_payer(world, 1)  # one more block after the payment's
    latest = await world.client.block_number()

    report = await world.report(from_block=latest)

    assert report.chain is not None
    assert (report.chain.from_block, report.chain.receipts_read) == (latest, 1)
    (finding,) = report.findings
    assert finding.category is Category.MATCHED
    assert report.reconciles


async def test_broken_ledger_invariants_are_reported(world: World) -> None:
    account_id = await new_account(world.engine)
    other_id = await new_account(world.engine)
    # Usage edited without a usage record; a hold left open an hour past its expiry.
    await execute(world.engine, "UPDATE accounts SET usage_micros = 4242 WHERE id = :id",
                  id=account_id)
    await execute(world.engine,
                  "INSERT INTO holds (request_id, account_id, amount_micros, expires_at)"
                  " VALUES ('req_old_hold', :id, 77, now() - interval '1 hour')", id=other_id)
    await execute(world.engine, "UPDATE accounts SET held_micros = 77 WHERE id = :id",
                  id=other_id)

    report = await world.report()

    assert {(b.check, b.account_id) for b in report.breaches} == {
        (Check.USAGE_TOTAL, account_id), (Check.HOLD_OVERDUE, other_id)}
    usage = next(b for b in report.breaches if b.check is Check.USAGE_TOTAL)
    assert (usage.recorded_micros, usage.expected_micros) == (4242, 0)
    overdue = next(b for b in report.breaches if b.check is Check.HOLD_OVERDUE)
    assert (overdue.subject, overdue.recorded_micros) == ("req_old_hold", 77)
    assert not report.reconciles


async def test_a_charged_request_still_held_is_usage_counted_twice(world: World) -> None:
    account_id = await new_account(world.engine)
    await execute(world.engine, """
        WITH record AS (
            INSERT INTO usage_records (request_id, account_id, public_model, provider,
                upstream_model, prompt_tokens, completion_tokens, cached_tokens,
                reasoning_tokens, base_cost_micros, commission_rate_bps, commission_micros,
                total_micros, status, streamed, usage_source)
            VALUES ('req_twice', :id, 'm', 'p', 'm', 1, 1, 0, 0, 10, 1000, 1, 11, 'ok', false,
                    'upstream') RETURNING 1)
        INSERT INTO holds (request_id, account_id, amount_micros, expires_at)
        VALUES ('req_twice', :id, 20, now() + interval '1 hour')""", id=account_id)
    await execute(world.engine,
                  "UPDATE accounts SET usage_micros = 11, held_micros = 20 WHERE id = :id",
                  id=account_id)

    (breach,) = (await world.report()).breaches

    assert (breach.check, breach.subject, breach.account_id) == (
        Check.HOLD_NOT_RELEASED, "req_twice", account_id)


async def test_without_a_chain_only_the_ledger_is_checked(world: World) -> None:
    from app.reconcile.reconciler import reconcile

    account_id = await new_account(world.engine)
    await record_payment(world.engine, account_id=account_id, reference=new_reference(),
                         amount=5, payer="0x" + "33" * 20, tx_hash=None)

    report = await reconcile(world.engine, None, chain_skipped="no chain here")

    assert report.chain is None and report.chain_skipped == "no chain here"
    assert report.findings == () and report.breaches == ()
    assert report.reconciles


async def test_a_node_refusing_wide_block_ranges_is_read_in_narrower_ones(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = await paid_on_chain(world, 100)
    await world.client.w3.provider.make_request("anvil_mine", [100])  # type: ignore[arg-type]
    second = await paid_on_chain(world, 200)
    for (payer, reference, tx_hash), amount in ((first, 100), (second, 200)):
        account_id = await new_account(world.engine, payer.address)
        await record_payment(world.engine, account_id=account_id, reference=reference,
                             amount=amount, payer=payer.address, tx_hash=tx_hash)
    get_logs = world.client.w3.eth.get_logs
    spans: list[tuple[int, bool]] = []

    async def refusing_wide_ranges(params: Any) -> Any:
        span = params["toBlock"] - params["fromBlock"] + 1
        spans.append((span, span <= 20))
        if span > 20:
            raise RpcError("query exceeds the 20 block range limit", code=-32005)
        return await get_logs(params)

    monkeypatch.setattr(world.client.w3.eth, "get_logs", refusing_wide_ranges)

    report = await world.report()

    assert [finding.category for finding in report.findings] == [Category.MATCHED] * 2
    assert report.chain is not None and report.chain.receipts_read == 0
    # The whole range, then a quarter of it, then the smallest span, which the node takes.
    whole = report.chain.to_block - report.chain.from_block + 1
    assert [span for span, accepted in spans if not accepted] == [whole, whole // 4] * 2
    assert max(span for span, accepted in spans if accepted) == 16
