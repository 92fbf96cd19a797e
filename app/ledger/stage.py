"""The record stage: every completed call becomes one usage record, before its last byte."""

from __future__ import annotations

import logging

from app.config.settings import Settings
from app.http.metrics import Metrics
from app.ledger.money import COST_UNIT, price_usage
from app.ledger.recorder import UsageEntry, UsageRecorder
from app.proxy.pipeline import ChatCall

log = logging.getLogger(__name__)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


class LedgerStage:
    """Prices the outcome, writes the record and the debt, and tells the caller the cost."""

    name = "ledger"

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.commission_bps = settings.commission_bps
        self.metrics = metrics
        self.recorder: UsageRecorder | None = None  # set at startup

    async def admit(self, call: ChatCall) -> None:
        return None

    async def settle(self, call: ChatCall) -> None:
        outcome = call.outcome
        usage = outcome.usage
        if usage is None or outcome.candidate is None or call.principal is None:
            # Nothing was produced: nothing is owed, nothing is recorded.
            return
        assert self.recorder is not None, "ledger used before startup"
        candidate = outcome.candidate
        cost = price_usage(candidate.model.price, usage, self.commission_bps)
        entry = UsageEntry(
            request_id=call.request_id,
            account_id=call.principal.account_id,
            session_jti=call.principal.session_jti,
            public_model=candidate.model.id,
            provider=candidate.route.provider.name,
            upstream_model=candidate.route.upstream_model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            base_cost_micros=cost.base_micros,
            commission_rate_bps=cost.commission_rate_bps,
            commission_micros=cost.commission_micros,
            total_micros=cost.total_micros,
            status=outcome.status,
            streamed=outcome.streamed,
            usage_source=usage.source,
            latency_ms=_ms(outcome.latency_s),
            time_to_first_chunk_ms=_ms(outcome.time_to_first_chunk_s),
        )
        recorded = await self.recorder.record(entry)
        if not recorded:
            log.error("usage of request %s was already recorded; not charged twice",
                      call.request_id)
            return
        call.usage_extra["cost"] = cost.to_api()
        call.response_headers["X-Tollgate-Cost"] = str(cost.total_micros)
        call.response_headers["X-Tollgate-Cost-Unit"] = COST_UNIT
        self.metrics.spent(candidate.model.id, cost.base_micros, cost.commission_micros)
