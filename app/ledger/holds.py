"""Holds: before a call is forwarded, the most it can cost is reserved on its account.

A hold is a TigerBeetle pending transfer. It is taken by one statement that also
applies the balance rule (``app.ledger.balance``): the account row is updated
only if ``balance + open holds + max cost <= credit limit``, and the hold row is
inserted only if that update happened. The statement locks the account row and
checks the rule against its latest committed totals, so however many processes
admit at once, the sum of their holds never passes the limit. Concurrent
requests share that statement (group commit, ``HoldTaker``).

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
from dataclasses import dataclass

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import ServiceUnavailable
from app.ledger.balance import ADMITS_SQL, EFFECTIVE_CREDIT_LIMIT_SQL
from app.ledger.connection import WriterConnection
from app.ledger.group_commit import GroupCommitter
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

# Requests taking holds: beyond this many waiting, new ones wait for room.
MAX_QUEUED_HOLDS = 10_000
# Holds per statement: one statement locks every account it admits on.
MAX_BATCH_HOLDS = 500
TAKE_ATTEMPTS = 2
TAKE_RETRY_DELAY_S = 0.05

# The admission of a batch, in one statement and one round trip ($1 request ids,
# $2 accounts, $3 amounts, $4 lifetimes in seconds; position = arrival order).
# ``existing`` makes it idempotent by request id: a retry after a lost answer finds
# its own hold instead of taking a second one (the outer query reads the snapshot
# taken before the statement, so it sees a hold committed by an earlier attempt but
# not the ones inserted here). ``locked`` locks the batch's accounts in id order (so
# two writers never deadlock) and reads their latest committed totals. Within an
# account, requests are admitted in arrival order while the running sum of their
# amounts fits the balance rule: the first that does not fit, and every later one
# of that account in the batch, is refused (the stage retries a refusal alone).
# Each hold taken comes back with the account's room after it (what the balance rule
# still admits once it and the batch's earlier holds on that account are counted).
TAKE_HOLDS = f"""
WITH request AS (
    SELECT request_id, account_id, amount_micros AS amount, lifetime_s, position
    FROM ROWS FROM (json_to_recordset($1::json)
                    AS (request_id text, account_id bigint, amount_micros bigint,
                        lifetime_s integer))
        WITH ORDINALITY AS r(request_id, account_id, amount_micros, lifetime_s, position)
), existing AS (
    SELECT request_id FROM {holds.name} WHERE request_id IN (SELECT request_id FROM request)
), locked AS (
    SELECT id, usage_micros, paid_micros, held_micros, credit_limit_micros,
           settlement_failed_at
    FROM {accounts.name}
    WHERE id IN (SELECT account_id FROM request)
    ORDER BY id
    FOR UPDATE
), queued AS (
    SELECT request.*,
           sum(amount) OVER (PARTITION BY account_id ORDER BY position) AS running
    FROM request
    WHERE request_id NOT IN (SELECT request_id FROM existing)
), admitted AS (
    SELECT queued.*,
           ({EFFECTIVE_CREDIT_LIMIT_SQL} - (usage_micros - paid_micros + held_micros
                                            + queued.running))::bigint AS room
    FROM queued JOIN locked ON locked.id = queued.account_id
    WHERE {ADMITS_SQL.format(cost="queued.running")}
), totals AS (
    UPDATE {accounts.name} AS account
    SET held_micros = account.held_micros + sums.amount
    FROM (SELECT account_id, sum(amount)::bigint AS amount FROM admitted
          GROUP BY account_id) AS sums
    WHERE account.id = sums.account_id
    RETURNING account.id
), taken AS (
    INSERT INTO {holds.name} (request_id, account_id, amount_micros, expires_at)
    SELECT request_id, account_id, amount, now() + lifetime_s * interval '1 second'
    FROM admitted
    RETURNING request_id
)
SELECT request_id, room FROM taken JOIN admitted USING (request_id)
UNION ALL
SELECT request_id, NULL FROM existing
"""


@dataclass(frozen=True, slots=True)
class Taken:
    """A hold that exists, and the credit its account had left right after it was taken."""

    # None when an earlier attempt with the same request id took the hold.
    room_micros: int | None


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """Reserve ``amount_micros`` on an account for one request, for ``lifetime_s``."""

    request_id: str
    account_id: int
    amount_micros: int
    lifetime_s: int

    def __post_init__(self) -> None:
        assert self.amount_micros >= 0 and self.lifetime_s > 0


class HoldTaker:
    """The process's single writer of holds, with group commit.

    The holds connection commits asynchronously (``synchronous_commit=off``): the
    statement returns, and the account row's lock is released, without waiting
    for the disk. That is safe for a hold. Postgres's log is written in order, so
    the durable commit of the request's usage record later flushes the hold with
    it; a hold lost in a database crash was only a reservation for a call whose
    record (written after the restart) then finds no hold to resolve, which the
    recorder accepts.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.connection = WriterConnection(engine, name="holds", synchronous_commit=False)
        self.writer: GroupCommitter[HoldRequest, Taken | None] = GroupCommitter(
            "holds", self._write_batch, _unavailable, max_batch=MAX_BATCH_HOLDS,
            max_queued=MAX_QUEUED_HOLDS, attempts=TAKE_ATTEMPTS,
            retry_delay_s=TAKE_RETRY_DELAY_S,
        )

    def start(self) -> None:
        self.writer.start()

    async def stop(self) -> None:
        await self.writer.stop()
        await self.connection.close()

    async def take(self, request: HoldRequest) -> Taken | None:
        """Reserve the amount if the balance rule admits it.

        None: refused, nothing changed. ``Taken``: the hold exists (taken now, or by
        an earlier attempt with the same request id). Raises ``ServiceUnavailable``
        when the database could not answer.
        """
        return await self.writer.submit(request)

    async def _write_batch(self, batch: Sequence[HoldRequest]) -> list[Taken | None]:
        unique: dict[str, HoldRequest] = {}
        for request in batch:
            unique.setdefault(request.request_id, request)
        requests = list(unique.values())
        # One JSON document for the batch, as the usage records (app.ledger.recorder).
        rows = await self.connection.fetch(TAKE_HOLDS, orjson.dumps(requests).decode())
        held = {row["request_id"]: Taken(row["room"]) for row in rows}
        assert len(held) == len(rows), "one hold per request id"
        return [held.get(request.request_id) for request in batch]


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("the ledger is unavailable; the request was not forwarded",
                              code="ledger_unavailable")


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
