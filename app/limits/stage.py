"""The pipeline stage that applies an account's request and token limits to chat calls.

``admit`` debits one request and the most tokens the call can use (prompt
estimate plus output ceiling) from the account's two buckets in one step. When
the account's last verdict in this process left room, the verdict is deferred
(``ChatCall.defer``): the ledger takes its hold during the Redis round trip, and
a refusal releases it. After a refusal, admission waits for the verdict first,
so a client hammering its limit never makes the ledger write.
A busy account's calls are admitted on tokens leased ahead instead, without a
round trip (``app.limits.leases``).
``settle`` gives back what the call did not use, or takes what it used beyond
the estimate, once the real usage is known: nothing produced counts as 0. While
the account has a lease, the correction stays in it (``RateLeases.absorb``) and
goes back with the lease's rest.

Until the identity stage sets ``call.principal``, a call has no account and no
account limits apply (the unauthenticated endpoints are limited per IP by
``app.limits.ip_limit`` instead). Once authentication is in place a chat call
without a principal cannot reach this stage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from app.identity.principal import Principal
from app.limits.bucket_keys import account_request_key, account_token_key
from app.limits.headers import publish_headers
from app.limits.leases import RateLeases
from app.limits.limiter import Admission, Limit, Limiter
from app.limits.token_buckets import Bucket
from app.proxy.pipeline import ChatCall, estimated_max_tokens

STAGE_NAME = "limits"
# Accounts whose last verdict is remembered (for overlapping admission), at most.
HAD_ROOM_ACCOUNTS_MAX = 100_000
REQUESTS_LABEL = "account_requests"
TOKENS_LABEL = "account_tokens"


class LimitsStage:
    """Per-account requests-per-minute and tokens-per-minute limits."""

    name = STAGE_NAME

    def __init__(self, limiter: Limiter, *, requests_per_min: int, tokens_per_min: int,
                 lease_s: float = 0.0, on_lease: Callable[[], None] = lambda: None) -> None:
        self.limiter = limiter
        self.requests_per_min = requests_per_min
        self.tokens_per_min = tokens_per_min
        # Corrections waiting to be sent, summed per bucket: while one flush is on its
        # way to Redis, the next requests' corrections pile up and go as one command.
        self._pending: dict[str, Bucket] = {}
        self._flusher: asyncio.Task[None] | None = None
        # Per account: did its last verdict here leave room for another call like it?
        self._had_room: dict[int, bool] = {}
        # A busy account's calls are admitted on tokens leased ahead (0 s: never).
        self.leases = (RateLeases(limiter, self._queue, lease_s, on_lease) if lease_s > 0
                       else None)

    async def admit(self, call: ChatCall) -> None:
        if call.principal is None:
            return
        requests, tokens = self.limits(call.principal, estimated_max_tokens(call))
        if self.leases is not None:
            headers = self.leases.use(call.principal.account_id, requests, tokens)
            if headers is not None:
                call.notes[self.name] = tokens.bucket
                call.response_headers.update(headers)
                publish_headers(call.http, headers)
                return
        answer = self._confirm(call, self.limiter.start_acquire(requests, tokens), requests,
                               tokens)
        if self._had_room.get(call.principal.account_id, False):
            # The account had room a moment ago: the ledger takes its hold while the
            # verdict is on its way, and a refusal now releases that hold.
            call.defer(self.name, answer)
        else:
            # Refused (or unknown) before: no hold is taken for a call that may be
            # refused, so a client hammering its limit costs the ledger nothing.
            await answer

    async def _confirm(
        self, call: ChatCall, answer: Coroutine[Any, Any, Admission | None], requests: Limit,
        tokens: Limit,
    ) -> None:
        assert call.principal is not None
        account_id = call.principal.account_id
        try:
            admission = await answer
        except BaseException:
            self._remember(account_id, False)
            raise
        if admission is None:
            return  # Redis is down and the operator chose to fail open: nothing was debited.
        self._remember(account_id, admission.has_room_for_another(tokens.bucket.amount_tokens))
        if self.leases is not None:
            self.leases.offer(account_id, requests, tokens, admission)
        call.notes[self.name] = tokens.bucket
        call.response_headers.update(admission.headers)
        publish_headers(call.http, admission.headers)

    def _remember(self, account_id: int, had_room: bool) -> None:
        if len(self._had_room) >= HAD_ROOM_ACCOUNTS_MAX and account_id not in self._had_room:
            self._had_room.clear()  # Simple bound: forgetting only costs one overlap.
        self._had_room[account_id] = had_room

    async def settle(self, call: ChatCall) -> None:
        debit = call.notes.get(self.name)
        if debit is None:
            return
        assert isinstance(debit, Bucket), "limits notes hold the debited tokens bucket"
        usage = call.outcome.usage
        used_tokens = usage.total_tokens if usage is not None else 0
        # The script keeps levels within [-capacity, capacity]; a larger correction
        # (a wild usage report) would change nothing more.
        range_tokens = 2 * debit.capacity_tokens
        correction = max(-range_tokens, min(range_tokens, debit.amount_tokens - used_tokens))
        if correction == 0:
            return
        assert call.principal is not None, "a debit was made for an account"
        if self.leases is not None and self.leases.absorb(call.principal.account_id, debit,
                                                          correction):
            return
        # The correction is not money and the caller need not wait for it: it is
        # sent after the response, and shutdown waits for it (drain).
        self._queue(replace(debit, amount_tokens=correction))

    def _queue(self, correction: Bucket) -> None:
        queued = self._pending.get(correction.key)
        if queued is not None:
            total = queued.amount_tokens + correction.amount_tokens
            range_tokens = 2 * correction.capacity_tokens
            correction = replace(correction,
                                 amount_tokens=max(-range_tokens, min(range_tokens, total)))
        self._pending[correction.key] = correction
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            await asyncio.gather(*(self.limiter.adjust(bucket) for bucket in batch.values()
                                   if bucket.amount_tokens != 0))

    async def retire_leases(self) -> None:
        """Give every lease's rest back to the buckets (then ``drain`` sends it)."""
        if self.leases is not None:
            await self.leases.retire_all()

    async def drain(self) -> None:
        """Wait for corrections still on their way to Redis."""
        while self._flusher is not None and not self._flusher.done():
            await self._flusher

    def limits(self, principal: Principal, estimated_tokens: int) -> tuple[Limit, Limit]:
        """The account's two limits: its own overrides, or the global defaults."""
        requests_per_min = principal.rate_limit_requests_per_min
        if requests_per_min is None:
            requests_per_min = self.requests_per_min
        tokens_per_min = principal.rate_limit_tokens_per_min
        if tokens_per_min is None:
            tokens_per_min = self.tokens_per_min
        account_id = principal.account_id
        requests = Limit(
            REQUESTS_LABEL,
            "requests per minute for this account",
            Bucket(account_request_key(account_id), requests_per_min, 1),
        )
        tokens = Limit(
            TOKENS_LABEL,
            "tokens per minute for this account",
            Bucket(account_token_key(account_id), tokens_per_min, estimated_tokens),
        )
        return requests, tokens
