"""Costs exact to the micro-USD, one rounding rule (half up), commission from the exact base."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.config.catalog import Price
from app.ledger.money import Cost, price_usage, round_half_up
from app.proxy.pipeline import Usage

GPT_4O_MINI = Price(150_000, 600_000, 75_000)  # $0.15 / $0.60 / $0.075 per 1M
CLAUDE_SONNET = Price(3_000_000, 15_000_000, 300_000)
CHEAP = Price(1, 1, 1)  # $0.000001 per 1M tokens


@pytest.mark.parametrize(
    ("price", "usage", "bps", "expected"),
    [
        # 1000 prompt + 500 completion on gpt-4o-mini: 150 + 300 = 450 micro-USD exactly.
        (GPT_4O_MINI, Usage(1000, 500), 1000, Cost(450, 1000, 45)),
        # Cached tokens are part of prompt_tokens and priced at the cached rate.
        (GPT_4O_MINI, Usage(1000, 0, cached_tokens=400), 1000, Cost(120, 1000, 12)),
        # 1M in + 1M out on Claude Sonnet: $3 + $15.
        (CLAUDE_SONNET, Usage(1_000_000, 1_000_000), 1000, Cost(18_000_000, 1000, 1_800_000)),
        # 3 tokens on gpt-4o-mini: 0.45 micro-USD -> 0 (below half); commission 0.045 -> 0.
        (GPT_4O_MINI, Usage(3, 0), 1000, Cost(0, 1000, 0)),
        # 10 tokens: 1.5 micro-USD -> 2 (half up); commission 0.15 -> 0.
        (GPT_4O_MINI, Usage(10, 0), 1000, Cost(2, 1000, 0)),
        # 7 prompt + 3 output: 1.05 + 1.8 = 2.85 -> 3; commission 0.285 -> 0.
        (GPT_4O_MINI, Usage(7, 3), 1000, Cost(3, 1000, 0)),
        # Commission from the exact base: 35 tokens out = 21 micro; 10% = 2.1 -> 2.
        (GPT_4O_MINI, Usage(0, 35), 1000, Cost(21, 1000, 2)),
        # 25 tokens out = 15 micro; 10% = 1.5 -> 2 (half up).
        (GPT_4O_MINI, Usage(0, 25), 1000, Cost(15, 1000, 2)),
        # Zero commission rate, and a 0% / 100% edge.
        (GPT_4O_MINI, Usage(1000, 500), 0, Cost(450, 0, 0)),
        (GPT_4O_MINI, Usage(1000, 500), 10_000, Cost(450, 10_000, 450)),
        # Nothing at all.
        (GPT_4O_MINI, Usage(0, 0), 1000, Cost(0, 1000, 0)),
        (CHEAP, Usage(10**9, 10**9), 1000, Cost(2000, 1000, 200)),
    ],
)
def test_cost_table(price: Price, usage: Usage, bps: int, expected: Cost) -> None:
    cost = price_usage(price, usage, bps)
    assert cost == expected
    assert cost.total_micros == expected.base_micros + expected.commission_micros


def test_cost_api_shape() -> None:
    assert price_usage(GPT_4O_MINI, Usage(1000, 500), 1000).to_api() == {
        "cost_unit": "usd_micros", "base_cost": 450, "commission": 45,
        "commission_rate_bps": 1000, "total_cost": 495,
    }


@given(st.integers(0, 10**15), st.integers(1, 10**12))
def test_round_half_up_matches_exact_arithmetic(numerator: int, denominator: int) -> None:
    exact = Fraction(numerator, denominator)
    rounded = round_half_up(numerator, denominator)
    assert abs(Fraction(rounded) - exact) <= Fraction(1, 2)
    if exact - int(exact) == Fraction(1, 2):
        assert rounded == int(exact) + 1


prices = st.builds(Price, st.integers(0, 10**8), st.integers(0, 10**8), st.integers(0, 10**8))


@given(prices, st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**7),
       st.integers(0, 10_000))
def test_cost_is_within_half_a_unit_of_exact(
    price: Price, prompt: int, completion: int, cached: int, bps: int
) -> None:
    usage = Usage(prompt, completion, cached_tokens=min(cached, prompt))
    cost = price_usage(price, usage, bps)
    exact = Fraction(
        (prompt - usage.cached_tokens) * price.input_per_mtok_micros
        + usage.cached_tokens * price.cached_input_per_mtok_micros
        + completion * price.output_per_mtok_micros,
        10**6,
    )
    assert abs(cost.base_micros - exact) <= Fraction(1, 2)
    assert abs(cost.commission_micros - exact * bps / 10_000) <= Fraction(1, 2)
    assert cost.base_micros >= 0 and cost.commission_micros >= 0
