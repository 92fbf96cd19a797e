"""Holds: before a call is forwarded, the most it can cost is reserved on its account.

A hold is a TigerBeetle pending transfer. It is taken by one statement that also
applies the balance rule (``app.ledger.balance``): the account row is updated
only if ``balance + open holds + max cost <= credit limit``, and the hold row is
inserted only if that update happened. Postgres locks the row for the update and
re-checks the condition against the latest committed totals, so however many
processes admit at once, the sum of their holds never passes the limit.

A hold resolves exactly once: the call's usage record is written and the hold
deleted in one statement (``app.ledger.recorder``), or the hold is released when
the call produced nothing, or it expires (``app.ledger.expiry``) when the process
that took it died.

**The maximum cost** of a call is the most expensive of its candidate models
(fallbacks included) for the prompt estimate and its output ceiling, rounded up
(``money.cost_ceiling_micros``):

    prompt  = ceil(prompt characters / 4) + 3 + 4 per message
    output  = (max_tokens, or the model's max output tokens) x n

The output part is a hard ceiling (providers stop there). The prompt part is an
estimate: four characters per token plus the chat format's overhead per message,
as OpenAI counts it. Tool definitions and images are not in it, so a prompt that
tokenizes worse than that can cost more than its hold; the record is written all
the same (a completed request is never lost) and the overrun is logged.

**Lifetime.** A hold lives longer than its call can: each route is bounded by its
provider's ``total_timeout_s`` (the whole upstream request, stream included), the
routes are tried one after another, and settling takes at most the recorder's
retries. So a hold expires ``HOLD_SETTLE_MARGIN_S`` after the sum of its routes'
total timeouts; only a crashed (or wedged) process leaves one to expire.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncEngine

from app.ledger import driver
from app.ledger.balance import ADMITS_SQL
from app.ledger.money import cost_ceiling_micros
from app.proxy.pipeline import ChatCall, estimate_tokens
from app.proxy.routing import Candidate
from app.storage.tables import accounts, holds

# OpenAI's count of the chat format: every reply is primed with 3 tokens, and every
# message is wrapped in 4.
REPLY_PRIMING_TOKENS = 3
TOKENS_PER_MESSAGE = 4
# Beyond the routes' timeouts: the recorder's retries (3 attempts under a 10 s
# statement timeout, with backoff) and queueing for it, with room to spare.
HOLD_SETTLE_MARGIN_S = 120

# The admission, in one statement and one round trip ($1 account, $2 amount,
# $3 request id, $4 lifetime in seconds). ``existing`` makes it idempotent by request
# id: a retry after a lost answer finds its own hold instead of taking a second one.
# The outer query reads the snapshot taken before the statement, so it sees a hold
# committed by an earlier attempt but not the one inserted here.
TAKE_HOLD = f"""
WITH existing AS (
    SELECT amount_micros FROM {holds.name} WHERE request_id = $3
), admitted AS (
    UPDATE {accounts.name}
    SET held_micros = held_micros + $2
    WHERE id = $1
      AND NOT EXISTS (SELECT FROM existing)
      AND {ADMITS_SQL.format(cost="$2")}
    RETURNING id
), taken AS (
    INSERT INTO {holds.name} (request_id, account_id, amount_micros, expires_at)
    SELECT $3, id, $2, now() + $4::integer * interval '1 second' FROM admitted
    RETURNING request_id
)
SELECT (SELECT count(*) FROM taken) + (SELECT count(*) FROM existing) AS held
"""


def max_prompt_tokens(call: ChatCall) -> int:
    messages = call.chat.forward_body.get("messages")
    count = len(messages) if isinstance(messages, list) else 0
    return (estimate_tokens(call.chat.prompt_chars) + REPLY_PRIMING_TOKENS
            + TOKENS_PER_MESSAGE * count)


def max_cost_micros(call: ChatCall, commission_bps: int) -> int:
    """The most this call can cost on any of its candidates (see the module docstring)."""
    prompt = max_prompt_tokens(call)
    costs = []
    for model in {candidate.model.id: candidate.model for candidate in call.plan}.values():
        output = (call.chat.max_output_tokens or model.max_output_tokens) * call.chat.n
        costs.append(cost_ceiling_micros(model.price, prompt, output, commission_bps))
    assert costs, "a call has at least one candidate"
    return max(costs)


def hold_lifetime_s(plan: Sequence[Candidate]) -> int:
    """Longer than the call can take: every route's total timeout, plus settling."""
    routes_s = sum(candidate.route.provider.total_timeout_s for candidate in plan)
    return math.ceil(routes_s) + HOLD_SETTLE_MARGIN_S


async def take_hold(
    engine: AsyncEngine, *, account_id: int, request_id: str, amount_micros: int,
    lifetime_s: int,
) -> bool:
    """Reserve ``amount_micros`` for the request if the balance rule admits it.

    False: refused, nothing changed. True: the hold exists (taken now, or by an
    earlier attempt with the same request id).
    """
    assert amount_micros >= 0 and lifetime_s > 0
    rows = await driver.fetch(engine, TAKE_HOLD, account_id, amount_micros, request_id,
                              lifetime_s)
    held = int(rows[0]["held"])
    assert held in (0, 1), "one hold per request id"
    return held == 1
