"""The pipeline's order of admission: deferred answers, refusals, settlement."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import make_mocked_request

from app.config.catalog import Model, Price, Provider, Route
from app.errors import ApiError, CreditLimitExceeded, RateLimited
from app.proxy.chat_request import ChatRequest
from app.proxy.pipeline import ChatCall, Pipeline
from app.proxy.routing import Candidate


def chat_call() -> ChatCall:
    provider = Provider(name="p", base_url="http://127.0.0.1:9/v1")
    model = Model(id="m", routes=(Route(provider, "m"),), price=Price(1, 1, 1),
                  context_length=1000, max_output_tokens=10)
    chat = ChatRequest(model="m", fallback_models=(), provider=None, stream=False,
                       include_usage=False, max_output_tokens=None, n=1, prompt_chars=4,
                       forward_body={})
    request = make_mocked_request("POST", "/v1/chat/completions")
    return ChatCall("req_test", request, chat, (Candidate(model, model.routes[0]),))


class Deferring:
    """Sends its answer at admit and lets it arrive later, like the rate limiter."""

    name = "deferring"

    def __init__(self, refusal: ApiError | None = None) -> None:
        self.refusal = refusal
        self.answer: asyncio.Future[None] | None = None
        self.confirmed = False
        self.settled_after_confirmation: bool | None = None

    async def admit(self, call: ChatCall) -> None:
        self.answer = asyncio.get_running_loop().create_future()
        call.defer(self.name, self._confirm())

    async def _confirm(self) -> None:
        assert self.answer is not None
        await self.answer
        self.confirmed = True
        if self.refusal is not None:
            raise self.refusal

    async def settle(self, call: ChatCall) -> None:
        self.settled_after_confirmation = self.confirmed


class Later:
    """A later stage that sees the deferred answer still on its way, then answers."""

    name = "later"

    def __init__(self, earlier: Deferring, refusal: ApiError | None = None) -> None:
        self.earlier = earlier
        self.refusal = refusal
        self.overlapped = False
        self.settled = False

    async def admit(self, call: ChatCall) -> None:
        assert self.earlier.answer is not None
        self.overlapped = not self.earlier.answer.done()
        self.earlier.answer.set_result(None)
        if self.refusal is not None:
            raise self.refusal

    async def settle(self, call: ChatCall) -> None:
        self.settled = True


def credit_refusal() -> CreditLimitExceeded:
    return CreditLimitExceeded(balance_micros=0, held_micros=0, max_cost_micros=10,
                               credit_limit_micros=0)


async def test_a_deferred_answer_overlaps_later_stages_and_is_awaited_before_forwarding(
) -> None:
    deferring = Deferring()
    later = Later(deferring)
    call = chat_call()
    await Pipeline([deferring, later]).admit(call)
    assert later.overlapped and deferring.confirmed
    assert call.deferred == []
    assert [name for name, _ in call.timings] == ["deferring", "later", "deferring-wait"]


async def test_a_deferred_refusal_settles_every_stage_that_admitted() -> None:
    deferring = Deferring(RateLimited("slow down"))
    later = Later(deferring)
    with pytest.raises(RateLimited):
        await Pipeline([deferring, later]).admit(chat_call())
    assert later.settled, "the later stage's reservation is undone"
    assert deferring.settled_after_confirmation is True


async def test_a_deferred_refusal_wins_over_a_later_stages_refusal() -> None:
    """Reported as if the stages had answered one after the other."""
    deferring = Deferring(RateLimited("slow down"))
    later = Later(deferring, credit_refusal())
    with pytest.raises(RateLimited):
        await Pipeline([deferring, later]).admit(chat_call())
    assert deferring.settled_after_confirmation is True, "settled knowing its answer"


async def test_a_later_refusal_still_waits_for_the_deferred_answer() -> None:
    deferring = Deferring()
    later = Later(deferring, credit_refusal())
    with pytest.raises(CreditLimitExceeded):
        await Pipeline([deferring, later]).admit(chat_call())
    assert deferring.confirmed and deferring.settled_after_confirmation is True


async def test_overlap_returns_the_work_once_every_verdict_admitted() -> None:
    deferring = Deferring()
    pipeline = Pipeline([deferring])
    call = chat_call()
    await pipeline.admit(call, overlap=True)
    assert call.deferred, "the verdict is left pending for the forwarder"
    assert deferring.answer is not None

    async def work() -> str:
        assert not deferring.confirmed, "the upstream is asked while the verdict is out"
        deferring.answer.set_result(None)  # type: ignore[union-attr]
        return "answer"

    assert await pipeline.overlap(call, work()) == "answer"
    assert deferring.confirmed and not call.deferred and not call.settled


@pytest.mark.parametrize("work_finished_first", [False, True])
async def test_a_refusal_during_overlap_cancels_the_work_and_discards_its_result(
    work_finished_first: bool
) -> None:
    deferring = Deferring(refusal=credit_refusal())
    pipeline = Pipeline([deferring])
    call = chat_call()
    await pipeline.admit(call, overlap=True)
    assert deferring.answer is not None
    upstream_started = asyncio.Event()
    cancelled: list[bool] = []
    discarded: list[str] = []

    async def work() -> str:
        upstream_started.set()
        try:
            if not work_finished_first:
                await asyncio.Event().wait()  # An upstream that has not answered yet.
            return "stream"
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def discard(result: str) -> None:
        discarded.append(result)

    async def refuse_later() -> None:
        await upstream_started.wait()  # A quick upstream has answered by then.
        deferring.answer.set_result(None)  # type: ignore[union-attr]

    refusing = asyncio.ensure_future(refuse_later())
    with pytest.raises(CreditLimitExceeded):
        await pipeline.overlap(call, work(), discard)
    await refusing
    assert call.settled and deferring.settled_after_confirmation is True
    assert call.outcome.status == "error" and call.outcome.usage is None, "nothing to bill"
    if work_finished_first:
        assert discarded == ["stream"] and cancelled == []
    else:
        assert discarded == [] and cancelled == [True]
