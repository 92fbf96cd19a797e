"""The session-key policy cache: freshness, shared reads, outages, and the judgement."""

from __future__ import annotations

import asyncio

import pytest

from app.chain.errors import RpcUnavailable
from app.identity.session_policy import (
    ZERO_ADDRESS,
    PolicyFault,
    SessionPolicies,
    SessionPolicy,
)

ACCOUNT = "0x" + "ac" * 20
KEY = "0x" + "4e" * 20
SETTLEMENT = "0x" + "5e" * 20
TOKEN = "0x" + "70" * 20
NOW_S = 1_750_000_000.0


def live_policy(**overrides: object) -> SessionPolicy:
    values: dict[str, object] = {"token": TOKEN, "payee": SETTLEMENT,
                                 "valid_until_s": int(NOW_S) + 3600, "live": True}
    values.update(overrides)
    return SessionPolicy(**values)  # type: ignore[arg-type]


class FakeChain:
    """Answers policy reads from ``answer``; counts them; can be down or slow."""

    def __init__(self) -> None:
        self.answer = live_policy()
        self.reads = 0
        self.down = False
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()

    async def read(self, account: str, key: str) -> SessionPolicy:
        assert (account, key) == (ACCOUNT, KEY)
        self.reads += 1
        self.reading.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise RpcUnavailable("chain node unreachable")
        return self.answer


class Clocks:
    def __init__(self) -> None:
        self.monotonic_s = 100.0
        self.wall_s = NOW_S


def policies(chain: FakeChain, clocks: Clocks, *, fresh_s: float = 10.0,
             stale_grace_s: float = 60.0, entries_max: int = 100) -> SessionPolicies:
    return SessionPolicies(
        chain.read, chain_id=31337, settlement=SETTLEMENT, token=TOKEN, fresh_s=fresh_s,
        stale_grace_s=stale_grace_s, entries_max=entries_max,
        clock=lambda: clocks.monotonic_s, wall_clock=lambda: clocks.wall_s,
    )


async def test_a_warm_cache_asks_the_chain_once_per_freshness_window() -> None:
    chain, clocks = FakeChain(), Clocks()
    cache = policies(chain, clocks)
    for _ in range(5):
        assert await cache.for_session(ACCOUNT, KEY) == chain.answer
    assert chain.reads == 1
    clocks.monotonic_s += 10.0
    chain.answer = live_policy(token=ZERO_ADDRESS)
    assert await cache.for_session(ACCOUNT, KEY) == chain.answer, "stale: read again"
    assert chain.reads == 2


async def test_zero_freshness_reads_every_time() -> None:
    chain, clocks = FakeChain(), Clocks()
    cache = policies(chain, clocks, fresh_s=0)
    await cache.for_session(ACCOUNT, KEY)
    await cache.for_session(ACCOUNT, KEY)
    assert chain.reads == 2


async def test_concurrent_requests_share_one_read_and_survive_a_cancelled_caller() -> None:
    chain, clocks = FakeChain(), Clocks()
    chain.gate = asyncio.Event()
    cache = policies(chain, clocks)
    first = asyncio.ensure_future(cache.for_session(ACCOUNT, KEY))
    others = [asyncio.ensure_future(cache.for_session(ACCOUNT, KEY)) for _ in range(9)]
    await chain.reading.wait()
    first.cancel()  # A client that went away does not cancel the others' read.
    chain.gate.set()
    assert await asyncio.gather(*others) == [chain.answer] * 9
    assert chain.reads == 1


async def test_an_outage_serves_the_last_read_for_a_bounded_time() -> None:
    chain, clocks = FakeChain(), Clocks()
    cache = policies(chain, clocks, fresh_s=10.0, stale_grace_s=60.0)
    read = await cache.for_session(ACCOUNT, KEY)
    chain.down = True
    clocks.monotonic_s += 69.0
    assert await cache.for_session(ACCOUNT, KEY) == read, "within freshness + grace"
    clocks.monotonic_s += 1.0
    with pytest.raises(RpcUnavailable):
        await cache.for_session(ACCOUNT, KEY)


async def test_an_outage_without_an_earlier_read_or_at_authorize_is_an_error() -> None:
    chain, clocks = FakeChain(), Clocks()
    cache = policies(chain, clocks, fresh_s=0)
    chain.down = True
    with pytest.raises(RpcUnavailable):
        await cache.for_session(ACCOUNT, KEY)
    chain.down = False
    await cache.for_session(ACCOUNT, KEY)
    chain.down = True
    with pytest.raises(RpcUnavailable):
        await cache.for_authorize(ACCOUNT, KEY)


async def test_authorize_trusts_a_cached_pass_but_not_a_cached_refusal() -> None:
    chain, clocks = FakeChain(), Clocks()
    cache = policies(chain, clocks)
    chain.answer = live_policy(token=ZERO_ADDRESS, live=False)
    assert cache.fault(await cache.for_authorize(ACCOUNT, KEY)) is PolicyFault.NOT_GRANTED
    chain.answer = live_policy()  # The owner grants the key a second later.
    assert cache.fault(await cache.for_authorize(ACCOUNT, KEY)) is None
    await cache.for_authorize(ACCOUNT, KEY)
    assert chain.reads == 2


async def test_entries_are_bounded() -> None:
    clocks = Clocks()
    reads: list[tuple[str, str]] = []

    async def read(account: str, key: str) -> SessionPolicy:
        reads.append((account, key))
        return live_policy()

    cache = SessionPolicies(read, chain_id=1, settlement=SETTLEMENT, token=TOKEN, fresh_s=60,
                            entries_max=2, clock=lambda: clocks.monotonic_s)
    for key in ("0x01", "0x02", "0x03", "0x01"):
        await cache.for_session(ACCOUNT, key)
    assert reads[-1] == (ACCOUNT, "0x01"), "the oldest entry went first"
    assert len(reads) == 4


@pytest.mark.parametrize(("policy", "fault"), [
    (live_policy(), None),
    (live_policy(token=ZERO_ADDRESS, payee=ZERO_ADDRESS, valid_until_s=0, live=False),
     PolicyFault.NOT_GRANTED),
    (live_policy(live=False), PolicyFault.EXPIRED),
    # Past validUntil by our clock: expired without asking the chain.
    (live_policy(valid_until_s=int(NOW_S)), PolicyFault.EXPIRED),
    (live_policy(payee="0x" + "ab" * 20), PolicyFault.WRONG_TERMS),
    (live_policy(token="0x" + "ab" * 20), PolicyFault.WRONG_TERMS),
])
def test_fault(policy: SessionPolicy, fault: PolicyFault | None) -> None:
    assert policies(FakeChain(), Clocks()).fault(policy) is fault
