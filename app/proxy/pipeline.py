"""The request pipeline: authenticate -> rate-limit -> reserve -> forward -> record.

A ``Stage`` sees every chat call twice: ``admit`` before forwarding (it may
refuse with an ``ApiError``), and ``settle`` exactly once afterwards with the
final ``Outcome`` (tokens produced, status), even when the client went away.
Stages settle in reverse order of admission, like nested context managers, so
a reservation is turned into a record before the rate limiter is corrected.
``settle`` runs before the last byte of the response leaves; after a client
disconnect it runs shielded and tracked, so shutdown waits for it.

A stage may ``defer`` its verdict: its Redis or Postgres round trip then overlaps
the later stages, and with ``admit(call, overlap=True)`` the upstream request too
(``Pipeline.overlap``). Nothing reaches the client before every verdict is in; a
late refusal cancels the upstream request and is the answer. Stages defer only
when their last verdict for the account left room, so a refusal after the
upstream was asked is rare (another process spent the last of the credit).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from aiohttp import web

from app.errors import ApiError
from app.identity.principal import Principal
from app.proxy.chat_request import ChatRequest
from app.proxy.routing import Candidate

T = TypeVar("T")

# Steps shorter than this are not worth a Server-Timing entry.
SERVER_TIMING_MIN_S = 10e-6
# Until an upstream reports usage, a token is estimated as four characters.
CHARS_PER_TOKEN_ESTIMATE = 4

OutcomeStatus = Literal["ok", "error", "cancelled"]


@dataclass(slots=True)
class Usage:
    """Token counts of one completion; ``source`` says whether the upstream reported them."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    source: Literal["upstream", "estimated"] = "upstream"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: object) -> Usage | None:
        """Read an OpenAI ``usage`` object; None when it is absent or malformed."""
        if not isinstance(usage, dict):
            return None
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if not _count(prompt) or not _count(completion):
            return None
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0
        reasoning = (
            completion_details.get("reasoning_tokens")
            if isinstance(completion_details, dict)
            else 0
        )
        assert isinstance(prompt, int) and isinstance(completion, int)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=min(cached, prompt) if isinstance(cached, int) and cached > 0 else 0,
            reasoning_tokens=reasoning if isinstance(reasoning, int) and reasoning > 0 else 0,
        )

    def to_openai(self) -> dict[str, object]:
        body: dict[str, object] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }
        if self.source == "estimated":
            body["estimated"] = True
        return body


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN_ESTIMATE)


@dataclass(slots=True)
class Outcome:
    """What happened to one chat call; filled in while forwarding, final at settle."""

    status: OutcomeStatus = "error"
    candidate: Candidate | None = None
    usage: Usage | None = None
    streamed: bool = False
    completion_chars: int = 0
    attempts: int = 0
    error: ApiError | None = None
    started_s: float = field(default_factory=time.monotonic)
    first_chunk_s: float | None = None
    finished_s: float | None = None

    @property
    def produced_output(self) -> bool:
        return self.completion_chars > 0 or (
            self.usage is not None and self.usage.completion_tokens > 0
        )

    def mark_first_chunk(self) -> None:
        if self.first_chunk_s is None:
            self.first_chunk_s = time.monotonic()

    def finish(self, status: OutcomeStatus, prompt_chars: int) -> None:
        """Fix the status and make sure usage is known, estimating it if the upstream was silent.

        A completed call always has usage (the prompt was read even if the answer
        is empty); a failed or cancelled call that produced nothing has none: it
        costs nothing.
        """
        self.status = status
        self.finished_s = time.monotonic()
        if self.usage is None and (status == "ok" or self.produced_output):
            self.usage = Usage(
                prompt_tokens=estimate_tokens(prompt_chars),
                completion_tokens=estimate_tokens(self.completion_chars),
                source="estimated",
            )

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.started_s

    @property
    def time_to_first_chunk_s(self) -> float | None:
        return None if self.first_chunk_s is None else self.first_chunk_s - self.started_s


@dataclass(slots=True)
class ChatCall:
    """One chat completion request travelling through the pipeline."""

    request_id: str
    http: web.Request
    chat: ChatRequest
    plan: tuple[Candidate, ...]
    outcome: Outcome = field(default_factory=Outcome)
    # Set by the authentication stage; None only before it ran.
    principal: Principal | None = None
    # Routes that failed before one served, for logs and the error message.
    route_failures: list[str] = field(default_factory=list)
    # What settled stages add to the answer: headers, and fields of the final usage object.
    response_headers: dict[str, str] = field(default_factory=dict)
    usage_extra: dict[str, object] = field(default_factory=dict)
    # Stages keep what they need between admit and settle here, keyed by stage name.
    notes: dict[str, object] = field(default_factory=dict)
    admitted: list[Stage] = field(default_factory=list)
    settled: bool = False
    # Seconds spent in each step, in order, for the ``Server-Timing`` header.
    timings: list[tuple[str, float]] = field(default_factory=list)
    # Admissions sent but not yet answered (``defer``), awaited after the last stage.
    deferred: list[tuple[str, Coroutine[Any, Any, None]]] = field(default_factory=list)

    def defer(self, stage: str, confirmation: Coroutine[Any, Any, None]) -> None:
        """Let later stages admit while this stage's answer is on its way.

        The pipeline awaits ``confirmation`` after the last stage admitted, in the
        order deferred, and always awaits it, even when another stage refused.
        """
        self.deferred.append((stage, confirmation))

    def timed(self, name: str, started_s: float) -> None:
        self.timings.append((name, time.perf_counter() - started_s))

    def server_timing(self) -> str:
        """The ``Server-Timing`` header value: each step's duration in milliseconds.

        Steps under 10 µs (stages with nothing to do for this call) are left out.
        """
        return ", ".join(["%s;dur=%.2f" % (name, seconds * 1000)  # noqa: UP031 (faster)
                          for name, seconds in self.timings if seconds >= SERVER_TIMING_MIN_S])


def estimated_max_tokens(call: ChatCall) -> int:
    """The most tokens this call can use: prompt estimate plus its output ceiling.

    Rate limits pre-debit this and reservations hold its price; both are corrected
    to the real usage when the call settles.
    """
    model = call.plan[0].model
    output = call.chat.max_output_tokens or model.max_output_tokens
    return estimate_tokens(call.chat.prompt_chars) + output * call.chat.n


class Stage(Protocol):
    """One step of the pipeline (authentication, rate limit, reservation, record)."""

    name: str

    async def admit(self, call: ChatCall) -> None:
        """Let the call through or raise an ApiError."""

    async def settle(self, call: ChatCall) -> None:
        """Account for the final outcome. Called once per admitted call; must not raise."""


class Pipeline:
    """The ordered stages of every chat call."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)
        self._settling: set[asyncio.Task[None]] = set()

    async def admit(self, call: ChatCall, *, overlap: bool = False) -> None:
        """Run every stage's admission; a refusal settles the stages already passed.

        Stages admit in order. One may ``defer`` its answer (the rate limiter, whose
        Redis round trip then overlaps the ledger's Postgres one); deferred answers
        are awaited last. A refusal is reported as if stages had answered in order:
        a deferred stage's refusal wins over a later stage's. With ``overlap`` the
        deferred answers are left pending: the caller must then forward through
        ``overlap()``, which awaits them before anything reaches the client.
        """
        try:
            for stage in self.stages:
                started_s = time.perf_counter()
                await stage.admit(call)
                call.timed(stage.name, started_s)
                call.admitted.append(stage)
            if not overlap:
                await self._confirm(call)
        except BaseException as error:
            await self._refuse(call, error)

    async def overlap(self, call: ChatCall, work: Coroutine[Any, Any, T],
                      discard: Callable[[T], Awaitable[None]] | None = None) -> T:
        """Run ``work`` (the upstream request) while deferred verdicts arrive.

        Returns what ``work`` returns once every verdict admitted the call. A
        refusal (or this request's cancellation) cancels ``work``, hands what it
        had already produced to ``discard`` (an open upstream stream to close),
        settles the call and raises the refusal.
        """
        if not call.deferred:
            return await work
        task = asyncio.ensure_future(work)
        try:
            await self._confirm(call)
        except BaseException as error:
            task.cancel()
            done, = await asyncio.gather(task, return_exceptions=True)
            if discard is not None and not isinstance(done, BaseException):
                await discard(done)
            await self._refuse(call, error)
        return await task

    async def _refuse(self, call: ChatCall, error: BaseException) -> None:
        """Admission failed: settle what was admitted and raise the refusal to report."""
        refusal = await self._confirm_quietly(call)
        if refusal is not None and isinstance(error, ApiError):
            error = refusal
        call.outcome.error = error if isinstance(error, ApiError) else None
        call.outcome.finish("error", call.chat.prompt_chars)
        await self.settle_shielded(call)
        raise error from None

    async def _confirm(self, call: ChatCall) -> None:
        while call.deferred:
            name, confirmation = call.deferred.pop(0)
            started_s = time.perf_counter()
            await confirmation
            call.timed(f"{name}-wait", started_s)

    async def _confirm_quietly(self, call: ChatCall) -> ApiError | None:
        """Await every deferred answer (so each stage knows what it holds before it
        settles); return the first refusal among them."""
        refusal: ApiError | None = None
        while call.deferred:
            _, confirmation = call.deferred.pop(0)
            try:
                await confirmation
            except ApiError as error:
                refusal = refusal or error
            except Exception:
                pass  # The error that stopped admission is the one reported.
        return refusal

    async def settle(self, call: ChatCall) -> None:
        """Settle every admitted stage once. Safe to call again: later calls do nothing.

        A stage may refuse the outcome with an ApiError (the ledger, when it cannot
        record): every other stage still settles, then the first error is raised so
        the client is told instead of getting an answer that was not billed.
        """
        if call.settled:
            return
        call.settled = True
        assert call.outcome.finished_s is not None, "settle needs a finished outcome"
        assert not call.deferred, "every verdict is in before a call settles"
        refusal: ApiError | None = None
        started_s = time.perf_counter()
        for stage in reversed(call.admitted):
            stage_started_s = time.perf_counter()
            try:
                await stage.settle(call)
            except ApiError as error:
                refusal = refusal or error
            call.timed(f"settle-{stage.name}", stage_started_s)
        call.timed("settle", started_s)
        if refusal is not None:
            raise refusal

    async def settle_shielded(self, call: ChatCall) -> None:
        """Settle even if the caller is being cancelled (client gone, shutdown)."""
        if call.settled:
            return
        task = asyncio.ensure_future(self.settle(call))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)

    async def drain(self) -> None:
        """Wait for settlements that outlived their requests (called at shutdown)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
