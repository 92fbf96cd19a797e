"""Money: one unit, one rounding rule, no floats.

**Unit.** Every amount Tollgate stores or answers is an integer number of
**micro-USD** (``usd_micros``): 1 micro-USD = 10^-6 USD = 1 base unit of USDC (6
decimals), so ledger amounts and on-chain amounts are the same integers.

**Prices** are integer micro-USD per one million tokens (``app.config.catalog``).

**Rounding rule.** A cost is first computed exactly, as an integer in units of
10^-12 USD (tokens x micro-USD per million tokens). Each amount that is stored
(the base cost and the commission) is then rounded **half up** to whole micro-USD,
each from its exact value:

    base       = round_half_up(exact)
    commission = round_half_up(exact x commission_bps / 10_000)
    total      = base + commission

So the commission is never computed from an already rounded base, and the
rounding error of either amount is at most half a micro-USD.

**Holds round up.** A hold (``app.ledger.holds``) reserves the most a request can
cost, so it must never be smaller than the recorded cost could be. Its base and
commission are each rounded **up** from the same exact values the rule above
rounds half up; since each rounded-up amount is at least its rounded-half-up
counterpart, and the exact cost only grows with tokens, a hold priced for at least
the tokens actually used always covers the record.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.config.catalog import Price
from app.proxy.pipeline import Usage

COST_UNIT = "usd_micros"
TOKENS_PER_PRICE_UNIT = 1_000_000
BPS_PER_UNIT = 10_000


def round_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, for non-negative integers."""
    assert numerator >= 0 and denominator > 0
    return (2 * numerator + denominator) // (2 * denominator)


def round_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded up, for non-negative integers (holds only)."""
    assert numerator >= 0 and denominator > 0
    return -(-numerator // denominator)


@dataclass(frozen=True, slots=True)
class Cost:
    """What one request costs, in micro-USD."""

    base_micros: int
    commission_rate_bps: int
    commission_micros: int

    @property
    def total_micros(self) -> int:
        return self.base_micros + self.commission_micros

    def to_api(self) -> dict[str, object]:
        return {
            "cost_unit": COST_UNIT,
            "base_cost": self.base_micros,
            "commission": self.commission_micros,
            "commission_rate_bps": self.commission_rate_bps,
            "total_cost": self.total_micros,
        }


ZERO_COST = Cost(0, 0, 0)


def exact_cost(price: Price, usage: Usage) -> int:
    """Exact cost in 10^-12 USD. Cached prompt tokens are priced at the cached rate.

    As in OpenAI's usage, ``prompt_tokens`` includes the cached ones and
    ``completion_tokens`` includes reasoning tokens (billed as output).
    """
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    uncached = usage.prompt_tokens - cached
    return (
        uncached * price.input_per_mtok_micros
        + cached * price.cached_input_per_mtok_micros
        + usage.completion_tokens * price.output_per_mtok_micros
    )


def price_usage(price: Price, usage: Usage, commission_bps: int) -> Cost:
    """The cost of ``usage`` at ``price`` plus the commission, by the rounding rule above."""
    assert 0 <= commission_bps <= BPS_PER_UNIT
    exact = exact_cost(price, usage)
    base = round_half_up(exact, TOKENS_PER_PRICE_UNIT)
    commission = round_half_up(exact * commission_bps, TOKENS_PER_PRICE_UNIT * BPS_PER_UNIT)
    return Cost(base, commission_bps, commission)


def cost_ceiling_micros(
    price: Price, prompt_tokens: int, completion_tokens: int, commission_bps: int
) -> int:
    """The most ``prompt_tokens`` in and ``completion_tokens`` out can cost, commission included.

    Every prompt token is priced at the dearer of the input and cached-input rates
    (a catalog may price cached tokens above fresh ones), and both amounts are
    rounded up (see "Holds round up" above), so no record for at most these
    tokens can cost more.
    """
    assert prompt_tokens >= 0 and completion_tokens >= 0
    assert 0 <= commission_bps <= BPS_PER_UNIT
    prompt_price = max(price.input_per_mtok_micros, price.cached_input_per_mtok_micros)
    exact = prompt_tokens * prompt_price + completion_tokens * price.output_per_mtok_micros
    base = round_up(exact, TOKENS_PER_PRICE_UNIT)
    commission = round_up(exact * commission_bps, TOKENS_PER_PRICE_UNIT * BPS_PER_UNIT)
    return base + commission
