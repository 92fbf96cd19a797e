"""Holds in Postgres: the balance rule applied atomically, resolved once, expired when orphaned."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.ledger.audit import ledger_discrepancies
from app.ledger.expiry import sweep_expired_holds
from app.ledger.holds import HoldRequest, HoldTaker, Taken
from app.ledger.recorder import UsageRecorder
from app.storage.database import create_engine
from tests.ledger.conftest import account_row, make_account, open_holds, set_account
from tests.ledger.test_recorder import entry

LIFETIME_S = 600


def request_id() -> str:
    return f"req_{secrets.token_hex(8)}"


async def take(holds: HoldTaker, account_id: int, amount: int, rid: str | None = None
               ) -> Taken | None:
    return await holds.take(HoldRequest(rid or request_id(), account_id, amount, LIFETIME_S))


@pytest.fixture
async def holds(engine: AsyncEngine) -> AsyncIterator[HoldTaker]:
    taker = HoldTaker(engine)
    taker.start()
    yield taker
    await taker.stop()


@pytest.fixture
async def recorder(engine: AsyncEngine) -> AsyncIterator[UsageRecorder]:
    recorder = UsageRecorder(engine)
    recorder.start()
    yield recorder
    await recorder.stop()


async def test_a_hold_is_taken_only_while_the_rule_admits_it(
    engine: AsyncEngine, holds: HoldTaker
) -> None:
    account = await make_account(engine, credit_limit_micros=1_000)
    first = request_id()
    assert await take(holds, account, 600, first)
    assert not await take(holds, account, 401), "600 held + 401 > 1000"
    assert await take(holds, account, 400), "exactly at the limit is admitted"
    assert (await account_row(engine, account))["held_micros"] == 1_000
    # Idempotent by request id: a retry finds its hold and takes nothing more.
    assert await take(holds, account, 600, first)
    assert (await account_row(engine, account))["held_micros"] == 1_000
    assert len(await open_holds(engine, account)) == 2


async def test_payments_are_credit_and_usage_is_debt(
    engine: AsyncEngine, holds: HoldTaker
) -> None:
    account = await make_account(engine, credit_limit_micros=0)
    assert not await take(holds, account, 1), "no credit, nothing prepaid"
    await set_account(engine, account, paid_micros=500)
    assert await take(holds, account, 500), "what was prepaid can be spent"
    assert not await take(holds, account, 1)


async def test_a_flagged_account_has_no_credit(engine: AsyncEngine, holds: HoldTaker
                                                ) -> None:
    account = await make_account(engine, credit_limit_micros=1_000_000)
    await set_account(engine, account, settlement_failed_at=text("now()"))
    assert not await take(holds, account, 1)
    await set_account(engine, account, paid_micros=10)
    assert await take(holds, account, 10), "prepaid credit still serves it"


async def test_two_processes_never_hold_more_than_the_limit(
    engine: AsyncEngine, holds: HoldTaker, postgres_url: str
) -> None:
    """Two hold writers on two engines (as two processes) race 200 holds for room for 50."""
    account = await make_account(engine, credit_limit_micros=5_000)
    other_engine = create_engine(postgres_url)
    other = HoldTaker(other_engine)
    other.start()
    try:
        results = await asyncio.gather(*(
            take(holds if index % 2 else other, account, 100) for index in range(200)))
    finally:
        await other.stop()
        await other_engine.dispose()
    assert sum(result is not None for result in results) == 50
    assert (await account_row(engine, account))["held_micros"] == 5_000
    assert len(await open_holds(engine, account)) == 50
    assert await ledger_discrepancies(engine, [account]) == []


async def test_a_batch_admits_in_arrival_order_per_account(
    engine: AsyncEngine, holds: HoldTaker
) -> None:
    """Concurrent holds share statements; each account's are admitted first come, first served."""
    tight = await make_account(engine, credit_limit_micros=550)
    roomy = await make_account(engine, credit_limit_micros=10_000)
    tight_ids = [request_id() for _ in range(10)]
    results = await asyncio.gather(
        *(take(holds, tight, 100, rid) for rid in tight_ids),
        *(take(holds, roomy, 100) for _ in range(10)),
    )
    assert holds.writer.batches_written < 20, "concurrent holds shared statements"
    assert results[:10] == [Taken(room) for room in (450, 350, 250, 150, 50)] + [None] * 5, (
        "the first five in arrival order, each told the room it left")
    assert all(results[10:]), "another account's holds are not refused with them"
    assert set(await open_holds(engine, tight)) == set(tight_ids[:5])
    assert (await account_row(engine, tight))["held_micros"] == 500
    assert (await account_row(engine, roomy))["held_micros"] == 1_000
    assert await ledger_discrepancies(engine, [tight, roomy]) == []


async def test_one_request_id_twice_in_a_batch_holds_once(
    engine: AsyncEngine, holds: HoldTaker
) -> None:
    account = await make_account(engine, credit_limit_micros=1_000)
    rid = request_id()
    both = await asyncio.gather(take(holds, account, 300, rid), take(holds, account, 300, rid))
    assert None not in both
    assert await open_holds(engine, account) == {rid: 300}
    assert (await account_row(engine, account))["held_micros"] == 300


async def test_holds_commit_without_waiting_for_the_disk_and_records_with(
    holds: HoldTaker, recorder: UsageRecorder
) -> None:
    """The durability split the design rests on (see HoldTaker): holds async, records not."""
    assert (await holds.connection.fetch("SHOW synchronous_commit"))[0][0] == "off"
    assert (await recorder.connection.fetch("SHOW synchronous_commit"))[0][0] == "on"


async def test_a_killed_hold_connection_is_replaced(engine: AsyncEngine, holds: HoldTaker
                                                    ) -> None:
    account = await make_account(engine, credit_limit_micros=1_000)
    assert await take(holds, account, 100)
    pid = (await holds.connection.fetch("SELECT pg_backend_pid()"))[0][0]
    async with engine.begin() as connection:
        await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    # The batch on the dead connection fails, and its retry runs on a fresh one.
    assert await take(holds, account, 100)
    assert (await account_row(engine, account))["held_micros"] == 200
    assert (await holds.connection.fetch("SELECT pg_backend_pid()"))[0][0] != pid


async def test_recording_resolves_the_hold_in_the_same_write(
    engine: AsyncEngine, holds: HoldTaker, recorder: UsageRecorder
) -> None:
    account = await make_account(engine)
    rid = request_id()
    assert await take(holds, account, 500, rid)
    written = await recorder.record(entry(account, total=44, request_id=rid))
    assert (written.recorded, written.released_micros) == (True, 500)
    row = await account_row(engine, account)
    assert (row["usage_micros"], row["held_micros"]) == (44, 0)
    assert await open_holds(engine, account) == {}
    # A second release of the same request finds nothing and subtracts nothing.
    assert (await recorder.release(rid)).released_micros is None
    assert (await account_row(engine, account))["held_micros"] == 0
    assert await ledger_discrepancies(engine, [account]) == []


async def test_a_call_that_produced_nothing_releases_its_hold(
    engine: AsyncEngine, holds: HoldTaker, recorder: UsageRecorder
) -> None:
    account = await make_account(engine)
    held = [request_id() for _ in range(20)]
    for rid in held:
        assert await take(holds, account, 100, rid)
    results = await asyncio.gather(*(recorder.release(rid) for rid in held))
    assert [r.released_micros for r in results] == [100] * 20
    assert not any(r.recorded for r in results)
    row = await account_row(engine, account)
    assert (row["usage_micros"], row["held_micros"]) == (0, 0)


async def test_expired_holds_are_swept_once(
    engine: AsyncEngine, holds: HoldTaker, recorder: UsageRecorder
) -> None:
    account = await make_account(engine)
    crashed, alive = request_id(), request_id()
    assert await take(holds, account, 300, crashed)
    assert await take(holds, account, 200, alive)
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE holds SET expires_at = now() - interval '1 second'"
                 " WHERE request_id = :rid"), {"rid": crashed})
    # Another app's sweeper may get there first: what matters is the state after.
    await sweep_expired_holds(engine)
    assert await open_holds(engine, account) == {alive: 200}
    assert (await account_row(engine, account))["held_micros"] == 200
    assert await sweep_expired_holds(engine) == 0, "nothing left to expire"
    # The crashed request's process comes back after all and settles late: the record
    # is written, and the expired hold is not subtracted a second time.
    late = await recorder.record(entry(account, total=33, request_id=crashed))
    assert (late.recorded, late.released_micros) == (True, None)
    row = await account_row(engine, account)
    assert (row["usage_micros"], row["held_micros"]) == (33, 200)
    assert await ledger_discrepancies(engine, [account]) == []


async def test_held_can_never_go_negative(engine: AsyncEngine) -> None:
    """The CHECK constraint is the second path: a bug that over-releases fails loudly."""
    account = await make_account(engine)
    with pytest.raises(Exception, match="held_non_negative"):
        await set_account(engine, account, held_micros=-1)
