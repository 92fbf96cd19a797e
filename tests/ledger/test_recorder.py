"""Group commit: every record once, usage totals exact, duplicates never charged twice."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import ServiceUnavailable
from app.ledger.recorder import UsageEntry, UsageRecorder
from app.storage.database import create_engine
from app.storage.tables import accounts, usage_records
from tests.ledger.conftest import make_account


def entry(account_id: int, total: int = 11, request_id: str | None = None) -> UsageEntry:
    commission = total // 11
    return UsageEntry(
        request_id=request_id or f"req_{secrets.token_hex(8)}", account_id=account_id,
        session_jti=None, public_model="m", provider="p", upstream_model="u",
        prompt_tokens=10, completion_tokens=5, cached_tokens=0, reasoning_tokens=0,
        base_cost_micros=total - commission, commission_rate_bps=1000,
        commission_micros=commission, total_micros=total, status="ok", streamed=False,
        usage_source="upstream", latency_ms=3, time_to_first_chunk_ms=None,
    )


@pytest.fixture
async def recorder(engine: AsyncEngine) -> AsyncIterator[UsageRecorder]:
    recorder = UsageRecorder(engine)
    recorder.start()
    yield recorder
    await recorder.stop()


async def usage_and_count(engine: AsyncEngine, account_id: int) -> tuple[int, int]:
    async with engine.connect() as connection:
        usage = (await connection.execute(
            select(accounts.c.usage_micros).where(accounts.c.id == account_id))).scalar_one()
        count = (await connection.execute(
            select(func.count()).where(usage_records.c.account_id == account_id))).scalar_one()
    return int(usage), int(count)


async def test_concurrent_records_share_transactions(
    engine: AsyncEngine, recorder: UsageRecorder
) -> None:
    first, second = await make_account(engine), await make_account(engine)
    entries = [entry(first if i % 3 else second, total=11 + i) for i in range(300)]
    results = await asyncio.gather(*(recorder.record(e) for e in entries))
    assert all(result.recorded for result in results)
    for account in (first, second):
        mine = [e for e in entries if e.account_id == account]
        assert await usage_and_count(engine, account) == (sum(e.total_micros for e in mine),
                                                         len(mine))
    assert recorder.records_written == 300
    assert recorder.batches_written < 300, "concurrent records were grouped"


async def test_duplicate_request_id_is_charged_once(
    engine: AsyncEngine, recorder: UsageRecorder
) -> None:
    account = await make_account(engine)
    once = entry(account, total=22)
    assert (await recorder.record(once)).recorded is True
    assert (await recorder.record(once)).recorded is False, "sequential retry"
    again = await asyncio.gather(*(recorder.record(entry(account, 22, "req_same"))
                                   for _ in range(5)))
    assert sorted(w.recorded for w in again) == [False, False, False, False, True], \
        "same batch: one wins"
    assert await usage_and_count(engine, account) == (44, 2)


async def test_every_field_arrives_exactly_even_beyond_a_double(
    engine: AsyncEngine, recorder: UsageRecorder
) -> None:
    """Records travel as one JSON document: integers a float would round (2**53 + 1),
    text a naive encoder would break, nulls and booleans must all land as they were."""
    account = await make_account(engine)
    total = 2**53 + 1 + (2**53 + 1) // 10
    commission = total - (2**53 + 1)
    written = UsageEntry(
        request_id=f"req_{secrets.token_hex(8)}", account_id=account,
        session_jti='jti "quoted" \\ ünï', public_model="m/ünïcode ✓",
        provider="p\n", upstream_model="u\t",
        prompt_tokens=2**31 - 1, completion_tokens=0, cached_tokens=7, reasoning_tokens=3,
        base_cost_micros=2**53 + 1, commission_rate_bps=1000, commission_micros=commission,
        total_micros=total, status="ok", streamed=True, usage_source="estimated",
        latency_ms=None, time_to_first_chunk_ms=0,
    )
    assert (await recorder.record(written)).recorded
    async with engine.connect() as connection:
        row = (await connection.execute(select(usage_records).where(
            usage_records.c.request_id == written.request_id))).mappings().one()
    assert {name: row[name] for name in written.row()} == written.row()
    assert await usage_and_count(engine, account) == (total, 1)


async def test_unreachable_database_is_a_clear_503() -> None:
    dead = create_engine("postgresql://nobody@/tollgate?host=/nonexistent-socket-dir")
    recorder = UsageRecorder(dead)
    recorder.start()
    try:
        with pytest.raises(ServiceUnavailable) as error:
            await recorder.record(entry(1))
        assert error.value.code == "ledger_unavailable"
    finally:
        await recorder.stop()
        await dead.dispose()


def test_entry_refuses_totals_that_do_not_add_up() -> None:
    good = entry(1, total=11)
    with pytest.raises(AssertionError):
        UsageEntry(**{**good.row(), "total_micros": 12})


async def test_a_connection_killed_under_the_recorder_is_replaced(postgres_url: str) -> None:
    own_engine = create_engine(postgres_url)
    recorder = UsageRecorder(own_engine)
    recorder.start()
    try:
        account = await make_account(own_engine)
        assert (await recorder.record(entry(account, total=11))).recorded is True
        pid = (await recorder.connection.fetch("SELECT pg_backend_pid()"))[0][0]
        async with own_engine.connect() as killer:
            await killer.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        assert (await recorder.record(entry(account, total=22))).recorded is True
        assert await usage_and_count(own_engine, account) == (33, 2)
        assert (await recorder.connection.fetch("SELECT pg_backend_pid()"))[0][0] != pid
    finally:
        await recorder.stop()
        await own_engine.dispose()
