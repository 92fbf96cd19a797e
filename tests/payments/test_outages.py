"""Facilitator down or slow, RPC down: a clear 503, nothing charged, and the same payment
header works once the outage is over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from eth_utils import to_checksum_address
from hexbytes import HexBytes

from app.chain.contracts import bind_contract
from app.config.catalog import Catalog
from app.http.app import Backends
from tests.conftest import DevChain, RunningTollgate, make_settings, start_tollgate
from tests.identity.smart_accounts import RpcProxy
from tests.payments.test_x402_flow import (
    FUNDS,
    MIN_TOPUP,
    ask,
    funded_payer,
    ledger_for,
    pay,
    payment_header,
    usdc_balance,
)


class Facilitator:
    """A real x402 facilitator over HTTP that settles with the token's
    transferWithAuthorization from the operator, and can be slowed down or stopped."""

    def __init__(self, dev_chain: DevChain) -> None:
        self.dev_chain = dev_chain
        self.hold = asyncio.Event()
        self.hold.set()
        self.calls: list[str] = []
        self.runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/verify", self.verify)
        app.router.add_post("/settle", self.settle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.hold.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def verify(self, request: web.Request) -> web.Response:
        self.calls.append("verify")
        await self.hold.wait()
        return web.json_response({"isValid": True})

    async def settle(self, request: web.Request) -> web.Response:
        self.calls.append("settle")
        body = await request.json()
        authorization = body["paymentPayload"]["payload"]["authorization"]
        signature = body["paymentPayload"]["payload"]["signature"]
        usdc = bind_contract(self.dev_chain.client.w3, "TestUSDC",
                             self.dev_chain.deployment.token)
        call = usdc.functions.transferWithAuthorization(
            to_checksum_address(authorization["from"]), to_checksum_address(authorization["to"]),
            int(authorization["value"]), int(authorization["validAfter"]),
            int(authorization["validBefore"]), HexBytes(authorization["nonce"]),
            HexBytes(signature))
        tx = await self.dev_chain.wallet.transact(call)
        return web.json_response({"success": True, "transaction": "0x" + bytes(tx).hex(),
                                  "network": "eip155:31337", "payer": authorization["from"]})


@pytest.fixture
async def facilitator(dev_chain: DevChain) -> AsyncIterator[tuple[Facilitator, str]]:
    running = Facilitator(dev_chain)
    url = await running.start()
    yield running, url
    await running.stop()


async def tollgate_with(catalog: Catalog, backends: Backends, chain: Any, **settings: Any
                        ) -> RunningTollgate:
    return await start_tollgate(
        make_settings(x402_min_topup_micros=MIN_TOPUP, **settings), catalog,
        Backends(backends.database_url, backends.redis_url, chain=chain))


async def test_a_facilitator_settles_the_payment(
    catalog: Catalog, backends: Backends, dev_chain: DevChain, postgres_url: str,
    facilitator: tuple[Facilitator, str],
) -> None:
    server, url = facilitator
    tollgate = await tollgate_with(catalog, backends, dev_chain.config(),
                                   x402_facilitator_url=url)
    try:
        payer = await funded_payer(dev_chain)
        async with aiohttp.ClientSession() as http:
            header = payment_header(dev_chain, payer, await ask(http, tollgate))
            status, body = await pay(http, tollgate, header)
        assert status == 200, body
        assert server.calls == ["verify", "settle"]
        rows, paid = await ledger_for(postgres_url, payer.address)
        assert [(row.status, row.method) for row in rows] == [("confirmed", "facilitator")]
        assert paid == MIN_TOPUP
        assert await usdc_balance(dev_chain, payer.address) == FUNDS - MIN_TOPUP
    finally:
        await tollgate.runner.cleanup()


# Short, so the slow facilitator's first answer is a quick 503; resuming may need retries.
FACILITATOR_TIMEOUT_S = 0.5
RESUME_ATTEMPTS = 5


async def test_a_slow_then_down_facilitator_is_a_503_and_the_same_header_works_later(
    catalog: Catalog, backends: Backends, dev_chain: DevChain, postgres_url: str,
    facilitator: tuple[Facilitator, str],
) -> None:
    server, url = facilitator
    tollgate = await tollgate_with(catalog, backends, dev_chain.config(),
                                   x402_facilitator_url=url,
                                   x402_facilitator_timeout_s=FACILITATOR_TIMEOUT_S)
    try:
        payer = await funded_payer(dev_chain)
        async with aiohttp.ClientSession() as http:
            header = payment_header(dev_chain, payer, await ask(http, tollgate))
            server.hold.clear()  # slow: /verify does not answer within the timeout
            status, body = await pay(http, tollgate, header)
            assert status == 503 and body["error"]["code"] == "payment_pending", body
            rows, paid = await ledger_for(postgres_url, payer.address)
            assert [row.status for row in rows] == ["pending"] and paid == 0
            server.hold.set()  # back: the same header resumes the same payment
            # As a client would, on each 503 payment_pending: retry the same header. On a
            # loaded machine a resumed step can still miss the timeout once or twice.
            for _ in range(RESUME_ATTEMPTS):
                status, body = await pay(http, tollgate, header)
                if status != 503:
                    break
                assert body["error"]["code"] == "payment_pending", body
            assert status == 200, body
        rows, paid = await ledger_for(postgres_url, payer.address)
        assert [row.status for row in rows] == ["confirmed"] and paid == MIN_TOPUP
        assert await usdc_balance(dev_chain, payer.address) == FUNDS - MIN_TOPUP
    finally:
        await tollgate.runner.cleanup()


async def test_a_facilitator_that_is_gone_is_a_503(
    catalog: Catalog, backends: Backends, dev_chain: DevChain, postgres_url: str,
) -> None:
    tollgate = await tollgate_with(catalog, backends, dev_chain.config(),
                                   x402_facilitator_url="http://127.0.0.1:9")
    try:
        payer = await funded_payer(dev_chain)
        async with aiohttp.ClientSession() as http:
            header = payment_header(dev_chain, payer, await ask(http, tollgate))
            status, body = await pay(http, tollgate, header)
        assert status == 503 and body["error"]["code"] == "payment_pending", body
        assert await usdc_balance(dev_chain, payer.address) == FUNDS
    finally:
        await tollgate.runner.cleanup()


async def test_rpc_down_is_a_503_and_charges_nothing(
    catalog: Catalog, backends: Backends, dev_chain: DevChain, postgres_url: str,
) -> None:
    relay = RpcProxy(dev_chain.url)
    relayed = await relay.start()
    tollgate = await tollgate_with(catalog, backends, dev_chain.config(rpc_url=relayed))
    try:
        payer = await funded_payer(dev_chain)
        async with aiohttp.ClientSession() as http:
            header = payment_header(dev_chain, payer, await ask(http, tollgate))
            await relay.stop()
            status, body = await pay(http, tollgate, header)
        assert status == 503, body
        assert body["error"]["code"] == "chain_unavailable"
        rows, paid = await ledger_for(postgres_url, payer.address)
        assert rows == [] and paid == 0
        assert await usdc_balance(dev_chain, payer.address) == FUNDS
    finally:
        await tollgate.runner.cleanup()
        await relay.stop()
