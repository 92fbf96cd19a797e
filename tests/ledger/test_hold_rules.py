"""The arithmetic of holds: a hold covers every cost it can be resolved with; one rule, twice."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config.catalog import Catalog, Price
from app.ledger.balance import ADMITS_SQL, AccountBalance
from app.ledger.holds import HOLD_SETTLE_MARGIN_S, hold_lifetime_s, max_cost_micros
from app.ledger.money import cost_ceiling_micros, price_usage, round_up
from app.proxy.chat_request import parse_chat_request
from app.proxy.pipeline import ChatCall, Usage
from app.proxy.routing import plan_routes

prices = st.builds(Price, st.integers(0, 10**8), st.integers(0, 10**8), st.integers(0, 10**8))


@given(prices, st.integers(0, 10**7), st.integers(0, 10**7), st.data(), st.integers(0, 10_000))
def test_a_hold_covers_any_usage_within_its_tokens(
    price: Price, prompt: int, completion: int, data: st.DataObject, bps: int
) -> None:
    ceiling = cost_ceiling_micros(price, prompt, completion, bps)
    used_prompt = data.draw(st.integers(0, prompt))
    usage = Usage(used_prompt, data.draw(st.integers(0, completion)),
                  cached_tokens=data.draw(st.integers(0, used_prompt)),
                  reasoning_tokens=0)
    assert price_usage(price, usage, bps).total_micros <= ceiling


def test_holds_round_up() -> None:
    gpt_4o_mini = Price(150_000, 600_000, 75_000)
    # 7 prompt + 3 output: exactly 2.85 micro-USD, commission 0.285: the record says
    # 3 + 0, the hold 3 + 1.
    assert cost_ceiling_micros(gpt_4o_mini, 7, 3, 1000) == 4
    assert price_usage(gpt_4o_mini, Usage(7, 3), 1000).total_micros == 3
    # A cached rate above the fresh one prices every prompt token at the dearer rate.
    assert cost_ceiling_micros(Price(1_000_000, 0, 2_000_000), 10, 0, 0) == 20
    assert (round_up(0, 7), round_up(7, 7), round_up(8, 7)) == (0, 1, 2)


def chat_call(catalog: Catalog, body: dict[str, Any]) -> ChatCall:
    chat = parse_chat_request(body, max_messages=64, max_n=8)
    return ChatCall("req_rules", make_mocked_request("POST", "/v1/chat/completions"), chat,
                    plan_routes(catalog, chat))


def test_the_hold_covers_the_most_expensive_candidate(catalog: Catalog) -> None:
    hello = [{"role": "user", "content": "Hello"}]  # 2 tokens + 3 + 4 per message = 9
    # test-model: $1 in, $2 out per 1M, max output 4096; small-model: max output 100.
    alone = max_cost_micros(chat_call(catalog, {"model": "small-model", "messages": hello}),
                            1000)
    assert alone == round_up(9 * 10**6 + 100 * 2 * 10**6, 10**6) + round_up(
        (9 * 10**6 + 100 * 2 * 10**6) * 1000, 10**10)
    with_fallback = max_cost_micros(chat_call(catalog, {
        "model": "small-model", "models": ["test-model"], "messages": hello}), 1000)
    exact = 9 * 10**6 + 4096 * 2 * 10**6
    assert with_fallback == round_up(exact, 10**6) + round_up(exact * 1000, 10**10)
    # max_tokens and n bound the output of every candidate.
    capped = max_cost_micros(chat_call(catalog, {
        "model": "small-model", "models": ["test-model"], "messages": hello,
        "max_tokens": 10, "n": 3}), 0)
    assert capped == round_up(9 * 10**6 + 30 * 2 * 10**6, 10**6)


def test_a_hold_outlives_every_route(catalog: Catalog) -> None:
    call = chat_call(catalog, {"model": "fallback-model",
                               "messages": [{"role": "user", "content": "x"}]})
    total_s = sum(c.route.provider.total_timeout_s for c in call.plan)
    assert len(call.plan) > 1
    assert hold_lifetime_s(call.plan) >= total_s + HOLD_SETTLE_MARGIN_S


balances = st.builds(
    AccountBalance, st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**12),
    st.integers(0, 10**12), st.booleans())


@settings(max_examples=60, deadline=None)
@given(balances, st.integers(0, 10**12))
async def test_the_sql_rule_is_the_python_rule(
    engine: AsyncEngine, balance: AccountBalance, cost: int
) -> None:
    """The hold statement's condition and AccountBalance.admits agree on every state."""
    query = text(
        "SELECT " + ADMITS_SQL.format(cost=":cost") + " FROM (SELECT"
        " CAST(:usage AS bigint) AS usage_micros, CAST(:paid AS bigint) AS paid_micros,"
        " CAST(:held AS bigint) AS held_micros, CAST(:limit AS bigint) AS credit_limit_micros,"
        " CASE WHEN :flagged THEN now() END AS settlement_failed_at) AS account")
    async with engine.connect() as connection:
        admitted = (await connection.execute(query, {
            "cost": cost, "usage": balance.usage_micros, "paid": balance.paid_micros,
            "held": balance.held_micros, "limit": balance.credit_limit_micros,
            "flagged": balance.settlement_failed})).scalar_one()
    assert admitted == balance.admits(cost)


def test_a_refusal_names_the_smallest_payment() -> None:
    balance = AccountBalance(usage_micros=700, paid_micros=200, held_micros=300,
                             credit_limit_micros=1_000, settlement_failed=False)
    assert not balance.admits(201)
    refusal = balance.refusal(201)
    assert refusal.status == 402 and refusal.code == "credit_limit_exceeded"
    assert refusal.payment_required_micros == 1
    assert (refusal.balance_micros, refusal.held_micros, refusal.max_cost_micros,
            refusal.credit_limit_micros) == (500, 300, 201, 1_000)
    flagged = AccountBalance(700, 200, 300, 1_000, settlement_failed=True).refusal(201)
    assert flagged.code == "settlement_failed" and flagged.credit_limit_micros == 0
    assert flagged.payment_required_micros == 1_001
    assert AccountBalance(700, 200, 300, 0, True).admits(0) is False
