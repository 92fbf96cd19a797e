"""Billing through the real proxy: one record per completed request, exact costs, isolation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage.tables import usage_records
from tests.conftest import MockUpstream, RunningTollgate
from tests.identity.wallets import authorize, bearer
from tests.ledger.conftest import retire_leases

HELLO = [{"role": "user", "content": "Hello"}]
# test-model: $1 per 1M input, $2 per 1M output, $0.50 cached; commission 10%.


class Account:
    """A fresh account with its own session, so each test sees only its own records."""

    def __init__(self, tollgate: RunningTollgate, token: str) -> None:
        self.tollgate = tollgate
        self.headers = bearer(token)
        self.sdk = openai.AsyncOpenAI(base_url=tollgate.v1, api_key=token, max_retries=0)

    async def get(self, path: str, **params: Any) -> Any:
        async with aiohttp.ClientSession(headers=self.headers) as http, http.get(
            f"{self.tollgate.v1}{path}", params=params
        ) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def usage(self, **params: Any) -> list[dict[str, Any]]:
        return (await self.get("/usage", **params))["data"]  # type: ignore[no-any-return]


@pytest.fixture
async def account(tollgate: RunningTollgate) -> AsyncIterator[Account]:
    async with aiohttp.ClientSession() as http:
        session = await authorize(http, tollgate.url)
    account = Account(tollgate, session["token"])
    async with account.sdk:  # closed here, never by the garbage collector (tests/conftest.py)
        yield account


def expected_cost(prompt: int, completion: int, cached: int = 0) -> tuple[int, int]:
    exact = (prompt - cached) * 1_000_000 + cached * 500_000 + completion * 2_000_000
    base = (2 * exact + 10**6) // (2 * 10**6)
    commission = (2 * exact * 1000 + 10**10) // (2 * 10**10)
    return base, commission


async def test_every_completed_request_has_exactly_one_record(account: Account) -> None:
    async def one(index: int) -> tuple[str, Any]:
        raw = await account.sdk.chat.completions.with_raw_response.create(
            model="test-model", messages=[{"role": "user", "content": f"call {index}"}],
            extra_body={"mock": {"cached_tokens": 2}},
        )
        return raw.headers["x-request-id"], raw

    answers = await asyncio.gather(*(one(i) for i in range(40)))
    records = await account.usage(limit=100)
    assert sorted(r["request_id"] for r in records) == sorted(rid for rid, _ in answers)
    by_id = {r["request_id"]: r for r in records}
    total = 0
    for request_id, raw in answers:
        completion = raw.parse()
        usage = completion.usage
        record = by_id[request_id]
        base, commission = expected_cost(usage.prompt_tokens, usage.completion_tokens, 2)
        assert (record["base_cost"], record["commission"]) == (base, commission)
        assert record["total_cost"] == base + commission
        assert record["usage"]["cached_tokens"] == 2
        assert usage.model_extra["cost"]["total_cost"] == base + commission  # type: ignore[index]
        assert raw.headers["x-tollgate-cost"] == str(base + commission)
        total += base + commission
    # A lease this burst started holds credit until it is retired (5 s, or now).
    await retire_leases(account.tollgate.app)
    me = await account.get("/account")
    assert me["usage"] == me["balance"] == total and me["open_holds"] == 0
    assert me["totals"]["requests"] == 40 and me["totals"]["total_cost"] == total


async def test_stream_cost_is_in_the_final_usage_chunk(account: Account) -> None:
    stream = await account.sdk.chat.completions.create(
        model="test-model", messages=HELLO, stream=True, stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None
    cost = usage.model_extra["cost"]  # type: ignore[index]
    [record] = await account.usage()
    assert record["streamed"] is True and record["status"] == "ok"
    assert record["request_id"] == chunks[-1].id
    assert cost["total_cost"] == record["total_cost"] > 0
    assert cost["cost_unit"] == "usd_micros"


async def test_cancelled_stream_is_billed_for_what_was_produced(
    account: Account, mock_upstream: MockUpstream
) -> None:
    body = {"model": "test-model", "messages": HELLO, "stream": True,
            "mock": {"chunks": 100, "chunk_delay_ms": 50}}
    async with aiohttp.ClientSession(headers=account.headers) as http:
        response = await http.post(f"{account.tollgate.v1}/chat/completions", json=body)
        request_id = response.headers["X-Request-Id"]
        received = 0
        while received < 3:
            event = await response.content.readuntil(b"\n\n")
            received += b'"content":"' in event
        response.close()
    record = None
    for _ in range(500):  # the settlement runs shielded after the disconnect; wait for it
        records = await account.usage()
        if records:
            record = records[0]
            break
        await asyncio.sleep(0.01)
    assert record is not None, "the cancelled stream was recorded"
    assert record["request_id"] == request_id
    assert record["status"] == "cancelled"
    assert record["usage"]["source"] == "estimated"
    assert 0 < record["usage"]["completion_tokens"] < 100
    assert record["total_cost"] > 0


async def test_stream_cut_by_the_upstream_is_billed_as_error(account: Account) -> None:
    async with aiohttp.ClientSession(headers=account.headers) as http, http.post(
        f"{account.tollgate.v1}/chat/completions",
        json={"model": "cut-model", "messages": HELLO, "stream": True},
    ) as response:
        raw = await response.read()
    assert b'"error"' in raw
    [record] = await account.usage()
    assert record["status"] == "error" and record["provider"] == "cutter"
    assert record["usage"]["source"] == "estimated" and record["total_cost"] > 0


async def test_a_request_that_produced_nothing_costs_nothing(account: Account) -> None:
    with pytest.raises(openai.InternalServerError):
        await account.sdk.chat.completions.create(model="down-model", messages=HELLO)
    assert await account.usage() == []
    me = await account.get("/account")
    assert me["usage"] == me["open_holds"] == 0


async def test_one_account_never_reads_another(
    tollgate: RunningTollgate, account: Account, engine: AsyncEngine
) -> None:
    async with aiohttp.ClientSession() as http:
        other = Account(tollgate, (await authorize(http, tollgate.url))["token"])
    async with other.sdk:
        await other.sdk.chat.completions.create(model="test-model", messages=HELLO)
    await account.sdk.chat.completions.create(model="test-model", messages=HELLO)
    mine, theirs = await account.usage(), await other.usage()
    assert len(mine) == 1 and len(theirs) == 1
    assert mine[0]["request_id"] != theirs[0]["request_id"]
    # A cursor pointing past the other account's newest record still shows only mine.
    newest = int(theirs[0]["id"].removeprefix("ur_")) + 1000
    assert [r["id"] for r in await account.usage(starting_after=f"ur_{newest}")] == [
        mine[0]["id"]]
    async with engine.connect() as connection:
        owners = set((await connection.execute(
            select(usage_records.c.account_id).where(
                usage_records.c.request_id.in_([mine[0]["request_id"],
                                                theirs[0]["request_id"]]))
        )).scalars())
    assert len(owners) == 2


async def test_usage_pagination_and_filters(account: Account) -> None:
    for model in ("test-model", "test-model", "fallback-model"):
        await account.sdk.chat.completions.create(model=model, messages=HELLO)
    page = await account.get("/usage", limit=2)
    assert len(page["data"]) == 2 and page["has_more"] is True
    rest = await account.get("/usage", limit=2, starting_after=page["data"][-1]["id"])
    assert len(rest["data"]) == 1 and rest["has_more"] is False
    assert [r["model"] for r in await account.usage(model="fallback-model")] == [
        "fallback-model"]
    assert await account.usage(created_gte=4_000_000_000) == []


@pytest.mark.parametrize(("params", "param"), [
    ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "x"}, "limit"),
    ({"starting_after": "42"}, "starting_after"), ({"created_gte": "yesterday"}, "created_gte"),
])
async def test_usage_bad_parameters(
    account: Account, params: dict[str, str], param: str
) -> None:
    async with aiohttp.ClientSession(headers=account.headers) as http, http.get(
        f"{account.tollgate.v1}/usage", params=params
    ) as response:
        assert response.status == 400
        assert orjson.loads(await response.read())["error"]["param"] == param


async def test_account_endpoints_need_a_session(tollgate: RunningTollgate) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/account", "/usage"):
            async with http.get(f"{tollgate.v1}{path}") as response:
                assert response.status == 401
