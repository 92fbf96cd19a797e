"""Prometheus metrics, one set per process.

With several worker processes ``PROMETHEUS_MULTIPROC_DIR`` is set before any
worker starts; each process then writes its samples to files there and
``/metrics`` on any worker aggregates all of them.
"""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from app.proxy.pipeline import ChatCall
from app.proxy.upstream import RouteFailure

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The process's metric families, and a pipeline stage that records calls."""

    name = "metrics"

    def __init__(self) -> None:
        # Labelled children looked up by label values: prometheus' labels() is ~10 calls
        # and a lock each time; labels are bounded by the catalog, so the cache is too.
        self._children: dict[tuple[object, ...], Any] = {}
        # In multiprocess mode samples go to files, not to an in-memory registry.
        registry = None if multiprocess_mode() else CollectorRegistry()
        self.registry: CollectorRegistry | None = registry
        self.requests = Counter(
            "tollgate_requests", "Chat completion requests by outcome.",
            ["model", "provider", "status", "streamed"], registry=registry,
        )
        self.http_responses = Counter(
            "tollgate_http_responses", "HTTP responses by route and status code.",
            ["route", "code"], registry=registry,
        )
        self.latency = Histogram(
            "tollgate_request_duration_seconds", "Chat call latency, start to last byte.",
            ["model", "streamed"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.first_chunk = Histogram(
            "tollgate_time_to_first_chunk_seconds", "Streaming: time to the first chunk.",
            ["model", "provider"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.upstream_errors = Counter(
            "tollgate_upstream_errors", "Failed upstream attempts by provider and kind.",
            ["provider", "kind"], registry=registry,
        )
        self.tokens = Counter(
            "tollgate_tokens", "Tokens served by model and direction.",
            ["model", "direction"], registry=registry,
        )
        self.spend = Counter(
            "tollgate_spend_micros", "Recorded spend in micro-USD by model and part.",
            ["model", "part"], registry=registry,
        )
        self.in_flight = Gauge(
            "tollgate_in_flight_requests", "Chat calls being served.",
            registry=registry, multiprocess_mode="livesum",
        )
        self.leases = Counter(
            "tollgate_leases", "Leases taken ahead of a busy account's calls, by kind"
            " (credit: app.ledger.leases; rate_limit: app.limits.leases).",
            ["kind"], registry=registry,
        )
        self.revocation_feed_live = Gauge(
            "tollgate_revocation_feed_live",
            "Processes whose revocation feed is live (0: sessions are checked in Redis).",
            registry=registry, multiprocess_mode="livesum",
        )

    def lease_taken(self, kind: str) -> None:
        self._child(self.leases, kind).inc()

    # Pipeline stage: metrics see every call, first in and last out.
    async def admit(self, call: ChatCall) -> None:
        self.in_flight.inc()

    def _child(self, family: Any, *labels: str) -> Any:
        key = (id(family), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    async def settle(self, call: ChatCall) -> None:
        self.in_flight.dec()
        outcome = call.outcome
        model = outcome.candidate.model.id if outcome.candidate else call.chat.model
        provider = outcome.candidate.route.provider.name if outcome.candidate else "none"
        streamed = "true" if outcome.streamed else "false"
        self._child(self.requests, model, provider, outcome.status, streamed).inc()
        if outcome.latency_s is not None:
            self._child(self.latency, model, streamed).observe(outcome.latency_s)
        if outcome.streamed and outcome.time_to_first_chunk_s is not None:
            self._child(self.first_chunk, model, provider).observe(
                outcome.time_to_first_chunk_s)
        if outcome.usage is not None:
            self._child(self.tokens, model, "prompt").inc(outcome.usage.prompt_tokens)
            self._child(self.tokens, model, "completion").inc(outcome.usage.completion_tokens)

    async def count_response(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: every answer, refused ones included, by route and status."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        self._child(self.http_responses, route, str(response.status)).inc()

    def spent(self, model: str, base_micros: int, commission_micros: int) -> None:
        self._child(self.spend, model, "base").inc(base_micros)
        self._child(self.spend, model, "commission").inc(commission_micros)

    def upstream_failed(self, failure: RouteFailure) -> None:
        self._child(self.upstream_errors, failure.provider, failure.kind.value).inc()

    def exposition(self) -> bytes:
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    async def handle(self, request: web.Request) -> web.Response:
        body = self.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
