"""Admission through the real proxy: holds before forwarding, resolved once, 402 with the numbers.

test-model: $1 per 1M input, $2 per 1M output; commission 10%. The mock counts
3 + 4 per message + ceil(characters / 4) prompt tokens and answers 16 words
(one token each), so the numbers below are exact.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config.catalog import Catalog, build_catalog
from app.http.app import Backends
from app.http.keys import PIPELINE
from app.ledger.audit import ledger_discrepancies
from tests.conftest import (
    SECRET_PROVIDER_KEY,
    MockUpstream,
    RunningTollgate,
    make_settings,
    start_tollgate,
)
from tests.conftest import test_catalog_document as catalog_document
from tests.ledger.conftest import (
    Payer,
    account_row,
    ledger_stage,
    open_holds,
    recorded,
    retire_leases,
    set_account,
    sign_in,
)

HELLO = [{"role": "user", "content": "Hello"}]
CONCURRENT_REQUESTS = 200
# "call 123" is 8 characters: 2 estimated tokens + 3 + 4 = 9 prompt tokens, and
# max_tokens 50: the hold is ceil(9 x 1 + 50 x 2) = 109 + ceil(10.9) = 11 -> 120.
# The mock uses 9 + 16 tokens: 9 + 32 = 41 + round(4.1) = 4 -> 45.
HOLD_MICROS = 120
COST_MICROS = 45
# Room for 25 holds at once and 66 completed calls: far fewer than 200.
TIGHT_CREDIT_LIMIT_MICROS = 3_000


def numbered(index: int) -> dict[str, Any]:
    return {"model": "test-model", "max_tokens": 50,
            "messages": [{"role": "user", "content": f"call {index:03d}"}]}


async def post(http: aiohttp.ClientSession, base: str, payer: Payer, body: dict[str, Any]
               ) -> tuple[int, str, dict[str, Any]]:
    async with http.post(f"{base}/chat/completions", json=body,
                         headers=payer.headers) as response:
        return (response.status, response.headers["X-Request-Id"],
                orjson.loads(await response.read()))


def assert_payment_required(status: int, body: dict[str, Any], code: str) -> str:
    """A 402 in the OpenAI error shape; returns its message."""
    assert status == 402, body
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("payment_required", code, None)
    return str(error["message"])


async def assert_settled(engine: AsyncEngine, account_id: int, *running: RunningTollgate
                         ) -> Any:
    """Nothing held once the Tollgates' leases are retired, and the totals agree with the
    rows; returns the account row."""
    for tollgate in running:
        await retire_leases(tollgate.app)
    row = await account_row(engine, account_id)
    assert row["held_micros"] == 0
    assert await open_holds(engine, account_id) == {}
    assert await ledger_discrepancies(engine, [account_id]) == []
    return row


@pytest.fixture
async def second_tollgate(catalog: Catalog, backends: Backends
                          ) -> AsyncIterator[RunningTollgate]:
    """Another process's worth of Tollgate: its own pool, the same Postgres and Redis."""
    running = await start_tollgate(make_settings(), catalog, backends)
    yield running
    await running.runner.cleanup()


async def test_concurrent_requests_near_the_limit_never_push_it_over(
    tollgate: RunningTollgate, second_tollgate: RunningTollgate, engine: AsyncEngine
) -> None:
    payer = await sign_in(tollgate.url)
    await set_account(engine, payer.account_id, credit_limit_micros=TIGHT_CREDIT_LIMIT_MICROS)
    servers = (tollgate.v1, second_tollgate.v1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        answers = await asyncio.gather(*(
            post(http, servers[index % 2], payer, numbered(index))
            for index in range(CONCURRENT_REQUESTS)))

    statuses = Counter(status for status, _, _ in answers)
    assert set(statuses) == {200, 402}, statuses
    served = {rid for status, rid, _ in answers if status == 200}
    for status, _, body in answers:
        if status == 402:
            message = assert_payment_required(status, body, "credit_limit_exceeded")
            assert f"may cost up to {HOLD_MICROS} micro-USD" in message
        else:
            assert body["usage"]["cost"]["total_cost"] == COST_MICROS

    row = await assert_settled(engine, payer.account_id, tollgate, second_tollgate)
    assert row["usage_micros"] - row["paid_micros"] <= TIGHT_CREDIT_LIMIT_MICROS
    records = await recorded(engine, payer.account_id)
    assert set(records) == served, "every admitted request has exactly one record"
    assert row["usage_micros"] == COST_MICROS * len(served)


async def test_a_failed_upstream_releases_the_hold(
    tollgate: RunningTollgate, engine: AsyncEngine
) -> None:
    payer = await sign_in(tollgate.url)
    async with aiohttp.ClientSession() as http:
        for body in ({"model": "down-model", "messages": HELLO},
                     {"model": "down-model", "messages": HELLO, "stream": True}):
            status, _, _ = await post(http, tollgate.v1, payer, body)
            assert status == 502
    row = await assert_settled(engine, payer.account_id, tollgate)
    assert row["usage_micros"] == 0 and await recorded(engine, payer.account_id) == {}


async def test_a_client_disconnect_resolves_the_hold(
    tollgate: RunningTollgate, engine: AsyncEngine, mock_upstream: MockUpstream
) -> None:
    payer = await sign_in(tollgate.url)
    body = {"model": "test-model", "messages": HELLO, "stream": True,
            "provider": {"only": ["mock"]}, "mock": {"chunks": 200, "chunk_delay_ms": 50}}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{mock_upstream.root}/mock/stats") as response:
            cancelled_before = (await response.json())["cancelled"]
        response = await http.post(f"{tollgate.v1}/chat/completions", json=body,
                                   headers=payer.headers)
        request_id = response.headers["X-Request-Id"]
        while b'"content":"' not in await response.content.readuntil(b"\n\n"):
            pass
        assert list(await open_holds(engine, payer.account_id)) == [request_id]
        response.close()  # the client goes away mid-stream
        # The proxy settles, then closes its upstream request: once the upstream saw
        # the cancellation, the settlement has run or is tracked by the pipeline.
        async with http.get(f"{mock_upstream.root}/mock/wait",
                            params={"cancelled": cancelled_before + 1, "timeout_s": 5}
                            ) as waited:
            assert waited.status == 200
    await tollgate.app[PIPELINE].drain()
    row = await assert_settled(engine, payer.account_id, tollgate)
    [record] = (await recorded(engine, payer.account_id)).values()
    assert record["request_id"] == request_id and record["status"] == "cancelled"
    assert row["usage_micros"] == record["total_micros"] > 0


async def test_the_hold_covers_the_most_expensive_fallback(
    mock_upstream: MockUpstream, backends: Backends, engine: AsyncEngine
) -> None:
    document = catalog_document(mock_upstream)
    document["models"].append({
        "id": "dear-model", "context_length": 32768, "max_output_tokens": 1000,
        "price": {"input": "10.00", "output": "30.00", "cached_input": "5.00"},
        "routes": [{"provider": "mock", "model": "mock-gpt"}],
    })
    catalog = build_catalog(document, {"TEST_MOCK_KEY": SECRET_PROVIDER_KEY}, source="tests")
    running = await start_tollgate(make_settings(), catalog, backends)
    try:
        payer = await sign_in(running.url)
        # test-model could use 9 + 4096 tokens: 9 x $1 + 4096 x $2 = 8201 micro-USD;
        # dear-model 9 + 1000: 9 x $10 + 1000 x $30 = 30090, + 10% = 33099: held.
        body = {"model": "test-model", "models": ["dear-model"], "messages": HELLO,
                "stream": True, "mock": {"chunks": 40, "chunk_delay_ms": 50}}
        async with aiohttp.ClientSession(headers=payer.headers) as http, http.post(
            f"{running.v1}/chat/completions", json=body
        ) as response:
            request_id = response.headers["X-Request-Id"]
            await response.content.readuntil(b"\n\n")
            assert await open_holds(engine, payer.account_id) == {request_id: 33_099}
            await response.read()
        await assert_settled(engine, payer.account_id, running)
        [record] = (await recorded(engine, payer.account_id)).values()
        assert record["public_model"] == "test-model", "the first candidate served"
    finally:
        await running.runner.cleanup()


async def test_a_flagged_account_pays_before_it_is_served(
    tollgate: RunningTollgate, engine: AsyncEngine
) -> None:
    payer = await sign_in(tollgate.url)
    await set_account(engine, payer.account_id, settlement_failed_at=text("now()"))
    async with aiohttp.ClientSession() as http:
        status, _, body = await post(http, tollgate.v1, payer, numbered(1))
        message = assert_payment_required(status, body, "settlement_failed")
        assert "credit limit of 0 micro-USD" in message
        assert f"pay at least {HOLD_MICROS} micro-USD" in message
        # The settlement worker records a payment: the account is served on it.
        await set_account(engine, payer.account_id, paid_micros=HOLD_MICROS)
        status, _, _ = await post(http, tollgate.v1, payer, numbered(1))
        assert status == 200
    row = await assert_settled(engine, payer.account_id, tollgate)
    assert row["usage_micros"] - row["paid_micros"] == COST_MICROS - HOLD_MICROS


async def test_a_prepaying_payer_is_told_the_smallest_payment(
    tollgate: RunningTollgate, engine: AsyncEngine
) -> None:
    """Credit limit 0 (an x402 payer): exactly the named payment admits the request."""
    payer = await sign_in(tollgate.url)
    await set_account(engine, payer.account_id, credit_limit_micros=0)
    async with aiohttp.ClientSession() as http:
        status, _, body = await post(http, tollgate.v1, payer, numbered(7))
        message = assert_payment_required(status, body, "credit_limit_exceeded")
        assert f"pay at least {HOLD_MICROS} micro-USD" in message
        await set_account(engine, payer.account_id, paid_micros=HOLD_MICROS - 1)
        status, _, body = await post(http, tollgate.v1, payer, numbered(7))
        assert "pay at least 1 micro-USD" in assert_payment_required(
            status, body, "credit_limit_exceeded")
        await set_account(engine, payer.account_id, paid_micros=HOLD_MICROS)
        status, _, _ = await post(http, tollgate.v1, payer, numbered(7))
        assert status == 200
        async with http.get(f"{tollgate.v1}/account", headers=payer.headers) as response:
            account = await response.json()
    await assert_settled(engine, payer.account_id, tollgate)
    assert {key: account[key] for key in (
        "usage", "payments", "balance", "open_holds", "credit_limit", "available",
        "settlement_failed")} == {
        "usage": COST_MICROS, "payments": HOLD_MICROS, "balance": COST_MICROS - HOLD_MICROS,
        "open_holds": 0, "credit_limit": 0, "available": HOLD_MICROS - COST_MICROS,
        "settlement_failed": False}


def hold_writes(running: RunningTollgate) -> int:
    """Calls' holds this Tollgate has sent to Postgres so far (taken or refused; no leases)."""
    stage = ledger_stage(running.app)
    assert stage.holds is not None and stage.leases is not None
    return stage.holds.writer.writes_done - stage.leases.leases_asked


async def test_a_client_hammering_its_rate_limit_costs_the_ledger_nothing(
    tollgate: RunningTollgate, engine: AsyncEngine
) -> None:
    """Once refused, an account's next calls wait for the limiter before any hold."""
    payer = await sign_in(tollgate.url)
    await set_account(engine, payer.account_id, rate_limit_requests_per_min=3)
    async with aiohttp.ClientSession() as http:
        served = [(await post(http, tollgate.v1, payer, numbered(index)))[0]
                  for index in range(3)]
        # A lease the third call may have started is in, or is not coming.
        await retire_leases(tollgate.app)
        before = hold_writes(tollgate)
        refused = [(await post(http, tollgate.v1, payer, numbered(index)))[0]
                   for index in range(3, 8)]
    assert served + refused == [200] * 3 + [429] * 5
    assert hold_writes(tollgate) == before, "refused calls took no hold"
    await assert_settled(engine, payer.account_id, tollgate)


async def test_a_rate_limit_refusal_after_the_hold_was_taken_releases_it(
    tollgate: RunningTollgate, second_tollgate: RunningTollgate, engine: AsyncEngine
) -> None:
    """This process saw room, another spent it: the hold taken meanwhile is released."""
    payer = await sign_in(tollgate.url)
    await set_account(engine, payer.account_id, rate_limit_requests_per_min=2)
    async with aiohttp.ClientSession() as http:
        assert (await post(http, tollgate.v1, payer, numbered(0)))[0] == 200
        assert (await post(http, second_tollgate.v1, payer, numbered(1)))[0] == 200
        before = hold_writes(tollgate)
        status, _, body = await post(http, tollgate.v1, payer, numbered(2))
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert hold_writes(tollgate) - before == 1, "the hold was taken during the limiter's trip"
    row = await assert_settled(engine, payer.account_id, tollgate, second_tollgate)
    assert row["usage_micros"] == 2 * COST_MICROS, "only the served calls were charged"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_credit_refusal_after_the_upstream_was_asked_cancels_it(
    tollgate: RunningTollgate, engine: AsyncEngine, mock_upstream: MockUpstream, stream: bool
) -> None:
    """The last hold left room, so the next one is taken while the upstream is asked; the
    limit dropped meanwhile: the answer is the 402, the upstream request is cancelled,
    nothing is charged and nothing of the upstream's reaches the client."""
    payer = await sign_in(tollgate.url)
    await set_account(engine, payer.account_id, credit_limit_micros=10_000)
    async with aiohttp.ClientSession() as http:
        assert (await post(http, tollgate.v1, payer, numbered(0)))[0] == 200
        await set_account(engine, payer.account_id, credit_limit_micros=0)
        async with http.get(f"{mock_upstream.root}/mock/stats") as response:
            before = await response.json()
        # The upstream would answer in 3 s; the refusal comes from the ledger long before.
        body = {**numbered(1), "stream": stream, "provider": {"only": ["mock"]},
                "mock": {"latency_ms": 3000}}
        status, _, answer = await post(http, tollgate.v1, payer, body)
        assert_payment_required(status, answer, "credit_limit_exceeded")
        async with http.get(f"{mock_upstream.root}/mock/wait", params={
                "requests": before["requests"] + 1, "cancelled": before["cancelled"] + 1,
                "timeout_s": 5}) as waited:
            assert waited.status == 200, "the upstream was asked, then cancelled"
            requests_before = (await waited.json())["requests"]
        # The refusal made this process forget the room: the next call waits for its hold.
        status, _, answer = await post(http, tollgate.v1, payer, body)
        assert_payment_required(status, answer, "credit_limit_exceeded")
        async with http.get(f"{mock_upstream.root}/mock/stats") as response:
            assert (await response.json())["requests"] == requests_before, "not asked again"
    await tollgate.app[PIPELINE].drain()
    row = await assert_settled(engine, payer.account_id, tollgate)
    assert row["usage_micros"] == COST_MICROS, "only the first call was charged"
    assert len(await recorded(engine, payer.account_id)) == 1
