"""Credit leases: one hold for a busy account's calls, drawn by their records, exact throughout.

The first tests drive the recorder's draws directly; the others go through the real
proxy (test-model: every call "call NNN" with max_tokens 50 holds 120 micro-USD and
costs 45, see test_admission.py).
"""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config.catalog import Catalog
from app.http.app import Backends
from app.http.keys import METRICS
from app.identity.sessions import SESSIONS
from app.ledger.audit import ledger_discrepancies
from app.ledger.holds import HoldTaker
from app.ledger.leases import LEASE_ID_PREFIX, lease_size_micros
from app.ledger.recorder import UsageRecorder
from tests.conftest import RunningTollgate, make_settings, start_tollgate
from tests.ledger.conftest import (
    Payer,
    account_row,
    ledger_stage,
    make_account,
    open_holds,
    recorded,
    retire_leases,
    set_account,
    sign_in,
)
from tests.ledger.test_admission import (
    COST_MICROS,
    HOLD_MICROS,
    assert_payment_required,
    assert_settled,
    numbered,
    post,
)
from tests.ledger.test_holds import holds, recorder, take  # noqa: F401 (fixtures)
from tests.ledger.test_recorder import entry

LEASE_ID = f"{LEASE_ID_PREFIX}test"


def leased(account_id: int, total: int, lease_id: str = LEASE_ID):  # type: ignore[no-untyped-def]
    return dataclasses.replace(entry(account_id, total=total), lease_id=lease_id)


async def test_records_draw_their_totals_from_the_lease(
    engine: AsyncEngine, holds: HoldTaker, recorder: UsageRecorder  # noqa: F811
) -> None:
    account = await make_account(engine)
    lease_id = f"{LEASE_ID_PREFIX}{account}"
    assert await take(holds, account, 1_000, lease_id)
    writes = [leased(account, total, lease_id) for total in (11, 22, 33)]
    results = await asyncio.gather(*(recorder.record(write) for write in writes))
    assert [(r.recorded, r.lease_short) for r in results] == [(True, False)] * 3
    assert await open_holds(engine, account) == {lease_id: 1_000 - 66}
    row = await account_row(engine, account)
    assert (row["usage_micros"], row["held_micros"]) == (66, 1_000 - 66)
    # A retried record is not inserted, so it draws nothing: the owner is told.
    again = await recorder.record(writes[0])
    assert (again.recorded, again.lease_short) == (False, True)
    assert await open_holds(engine, account) == {lease_id: 1_000 - 66}
    # A shrink gives credit back; the release deletes what is left.
    assert not (await recorder.shrink(lease_id, 800)).lease_short
    assert (await account_row(engine, account))["held_micros"] == 134
    assert (await recorder.release(lease_id)).released_micros == 134
    row = await account_row(engine, account)
    assert (row["usage_micros"], row["held_micros"]) == (66, 0)
    assert await ledger_discrepancies(engine, [account]) == []


async def test_an_overrun_takes_what_is_left_and_is_still_recorded(
    engine: AsyncEngine, holds: HoldTaker, recorder: UsageRecorder  # noqa: F811
) -> None:
    account = await make_account(engine)
    lease_id = f"{LEASE_ID_PREFIX}{account}"
    assert await take(holds, account, 100, lease_id)
    written = await recorder.record(leased(account, 154, lease_id))
    assert (written.recorded, written.lease_short) == (True, True)
    assert await open_holds(engine, account) == {lease_id: 0}
    row = await account_row(engine, account)
    assert (row["usage_micros"], row["held_micros"]) == (154, 0)
    # A lease that expired (swept) is gone: a late record still counts, draws nothing.
    assert (await recorder.release(lease_id)).released_micros == 0
    late = await recorder.record(leased(account, 11, lease_id))
    assert (late.recorded, late.lease_short) == (True, True)
    assert (await account_row(engine, account))["usage_micros"] == 165
    assert await ledger_discrepancies(engine, [account]) == []


async def test_a_release_queued_with_a_draw_on_the_same_lease_follows_it(
    engine: AsyncEngine, holds: HoldTaker, recorder: UsageRecorder  # noqa: F811
) -> None:
    """One statement must not update and delete one row: such a batch is written in two."""
    account = await make_account(engine)
    lease_id = f"{LEASE_ID_PREFIX}{account}"
    assert await take(holds, account, 500, lease_id)
    drawn, released = await asyncio.gather(
        recorder.record(leased(account, 44, lease_id)), recorder.release(lease_id))
    assert (drawn.recorded, drawn.lease_short, released.released_micros) == (True, False, 456)
    row = await account_row(engine, account)
    assert (row["usage_micros"], row["held_micros"]) == (44, 0)
    assert await ledger_discrepancies(engine, [account]) == []


def test_a_lease_is_taken_only_where_the_room_is_ample() -> None:
    assert lease_size_micros(120, 7 * 120) is None
    assert lease_size_micros(120, 8 * 120) == 2 * 120  # a quarter of the room
    assert lease_size_micros(120, 10**9) == 32 * 120
    assert lease_size_micros(0, 10**9) is None


async def test_a_busy_account_is_admitted_on_one_lease(
    tollgate: RunningTollgate, engine: AsyncEngine
) -> None:
    payer = await sign_in(tollgate.url)
    stage = ledger_stage(tollgate.app)
    assert stage.holds is not None and stage.leases is not None
    writes_before, leases_before = stage.holds.writer.writes_done, stage.leases.leases_taken
    async with aiohttp.ClientSession() as http:
        for index in range(2):
            assert (await post(http, tollgate.v1, payer, numbered(index)))[0] == 200
        # The second call's hold was less than 5 s after the first: a lease is coming.
        await _lease_taken(tollgate, leases_before)
        [lease_id] = await open_holds(engine, payer.account_id)
        assert lease_id.startswith(LEASE_ID_PREFIX)
        answers = [await post(http, tollgate.v1, payer, numbered(index))
                   for index in range(2, 30)]
    assert {status for status, _, _ in answers} == {200}
    assert stage.holds.writer.writes_done - writes_before == 3, "two holds and one lease"
    leased_amount = 32 * HOLD_MICROS
    assert await open_holds(engine, payer.account_id) == {
        lease_id: leased_amount - 28 * COST_MICROS}
    row = await assert_settled(engine, payer.account_id, tollgate)
    assert row["usage_micros"] == 30 * COST_MICROS
    assert len(await recorded(engine, payer.account_id)) == 30


async def _lease_taken(running: RunningTollgate, before: int) -> None:
    leases = ledger_stage(running.app).leases
    assert leases is not None
    await leases.offers_answered()
    assert leases.leases_taken == before + 1


async def test_one_process_serves_every_call_the_rule_admits(
    tollgate: RunningTollgate, engine: AsyncEngine
) -> None:
    """Calls one after another up to the limit: exactly as many are served as with a hold
    each (the lease gives its spare credit back before a 402), then the 402."""
    payer = await sign_in(tollgate.url)
    await set_account(engine, payer.account_id, credit_limit_micros=4_000)
    # balance + 120 <= 4,000 admits while usage <= 3,880: 87 calls of 45 (3,870 < 3,880
    # after 86 calls), then usage 3,915 + 120 > 4,000.
    served = 0
    async with aiohttp.ClientSession() as http:
        while True:
            status, _, body = await post(http, tollgate.v1, payer, numbered(served))
            if status != 200:
                break
            served += 1
            assert served < 200, "the limit never refused"
    assert_payment_required(status, body, "credit_limit_exceeded")
    assert served == 87
    assert ledger_stage(tollgate.app).leases.leases_taken > 0  # type: ignore[union-attr]
    row = await assert_settled(engine, payer.account_id, tollgate)
    assert row["usage_micros"] == 87 * COST_MICROS


async def _no_open_holds(engine: AsyncEngine, account_id: int) -> None:
    # The condition is in Postgres, written by the lease's own timer: polled.
    while await open_holds(engine, account_id):  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def _busy(running: RunningTollgate, payer: Payer, calls: int) -> None:
    """Calls enough for a lease, and waits until the lease is taken."""
    leases = ledger_stage(running.app).leases
    assert leases is not None
    before = leases.leases_taken
    async with aiohttp.ClientSession() as http:
        for index in range(calls):
            assert (await post(http, running.v1, payer, numbered(index)))[0] == 200
    await _lease_taken(running, before)


async def test_a_lease_gives_everything_back_when_its_time_is_up(
    catalog: Catalog, backends: Backends, engine: AsyncEngine
) -> None:
    running = await start_tollgate(make_settings(credit_lease_s=0.2), catalog, backends)
    try:
        payer = await sign_in(running.url)
        await _busy(running, payer, 2)
        assert len(await open_holds(engine, payer.account_id)) == 1
        # Nothing asks for it: 0.2 s after it was taken the lease releases itself.
        await asyncio.wait_for(_no_open_holds(engine, payer.account_id), 10)
        row = await account_row(engine, payer.account_id)
        assert (row["held_micros"], row["usage_micros"]) == (0, 2 * COST_MICROS)
        assert await ledger_discrepancies(engine, [payer.account_id]) == []
    finally:
        await running.runner.cleanup()


async def test_a_stopping_process_releases_its_leases(
    catalog: Catalog, backends: Backends, engine: AsyncEngine
) -> None:
    running = await start_tollgate(make_settings(credit_lease_s=60), catalog, backends)
    try:
        payer = await sign_in(running.url)
        await _busy(running, payer, 2)
        assert len(await open_holds(engine, payer.account_id)) == 1
    finally:
        await running.runner.cleanup()
    assert await open_holds(engine, payer.account_id) == {}
    assert (await account_row(engine, payer.account_id))["held_micros"] == 0
    assert await ledger_discrepancies(engine, [payer.account_id]) == []


async def test_with_leases_off_every_call_takes_its_own_hold(
    catalog: Catalog, backends: Backends, engine: AsyncEngine
) -> None:
    running = await start_tollgate(make_settings(credit_lease_s=0), catalog, backends)
    try:
        stage = ledger_stage(running.app)
        assert stage.leases is None and stage.holds is not None
        payer = await sign_in(running.url)
        before = stage.holds.writer.writes_done
        async with aiohttp.ClientSession() as http:
            for index in range(5):
                assert (await post(http, running.v1, payer, numbered(index)))[0] == 200
        assert stage.holds.writer.writes_done - before == 5
        await assert_settled(engine, payer.account_id)
    finally:
        await running.runner.cleanup()


async def test_a_lease_spent_before_its_time_is_followed_by_a_larger_one(
    tollgate: RunningTollgate, engine: AsyncEngine
) -> None:
    payer = await sign_in(tollgate.url)
    leases = ledger_stage(tollgate.app).leases
    assert leases is not None
    await _busy(tollgate, payer, 2)
    first = leases.open_lease(payer.account_id)
    assert first is not None and first.amount_micros == 32 * HOLD_MICROS
    # One call at a time: each reserves 120 and draws 45, so 83 calls fit in 3,840
    # (after 82, 150 are left); the 84th finds 105.
    async with aiohttp.ClientSession() as http:
        for index in range(84):
            assert (await post(http, tollgate.v1, payer, numbered(index)))[0] == 200
            if first.retired:
                break
        assert first.retired and first.calls_admitted == 83
        # The call that found it spent took a hold of its own, and asked for a lease
        # for twice as many calls.
        await leases.offers_answered()
    second = leases.open_lease(payer.account_id)
    assert second is not None and second.amount_micros == 64 * HOLD_MICROS
    row = await assert_settled(engine, payer.account_id, tollgate)
    assert row["usage_micros"] == (2 + 84) * COST_MICROS


async def test_metrics_count_leases_and_show_the_revocation_feed(
    catalog: Catalog, backends: Backends
) -> None:
    running = await start_tollgate(make_settings(), catalog, backends)
    try:
        feed = running.app[SESSIONS].feed
        assert feed is not None
        await feed.wait_live()
        payer = await sign_in(running.url)
        await _busy(running, payer, 2)
        async with aiohttp.ClientSession() as http, http.get(
                f"{running.url}/metrics") as response:
            text = await response.text()
        lines = set(text.splitlines())
        assert 'tollgate_leases_total{kind="credit"} 1.0' in lines
        assert "tollgate_revocation_feed_live 1.0" in lines
        await feed.stop()
        assert running.app[METRICS].revocation_feed_live._value.get() == 0  # type: ignore[attr-defined]
    finally:
        await running.runner.cleanup()


async def test_the_account_says_how_much_of_its_holds_is_leased(
    tollgate: RunningTollgate, engine: AsyncEngine
) -> None:
    payer = await sign_in(tollgate.url)
    await _busy(tollgate, payer, 2)
    [(lease_id, remaining)] = (await open_holds(engine, payer.account_id)).items()
    assert lease_id.startswith(LEASE_ID_PREFIX)
    async with aiohttp.ClientSession(headers=payer.headers) as http:
        async with http.get(f"{tollgate.v1}/account") as response:
            account = await response.json()
        assert (account["open_holds"], account["leased"]) == (remaining, remaining)
        await retire_leases(tollgate.app)
        async with http.get(f"{tollgate.v1}/account") as response:
            account = await response.json()
    assert (account["open_holds"], account["leased"]) == (0, 0)
