"""Restarts: a worker killed at any point of a collection leaves a pending row that a fresh
worker finishes exactly once (one Settled event, the chain's ``collected`` and the ledger's
``paid_micros`` agreeing).

The nastiest kill is the one after the node accepted the transaction but before the worker
learned its hash: a JSON-RPC relay passes ``eth_sendRawTransaction`` on to anvil (which mines
it at once) and then never answers, and the test cancels the worker there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from eth_account import Account
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chain.client import ChainClient
from app.chain.operator import OperatorWallet
from app.settlement.worker import Outcome
from app.storage.tables import settlements
from tests.conftest import ANVIL_OPERATOR_KEY, DevChain
from tests.identity.smart_accounts import SmartAccounts
from tests.settlement.conftest import (
    account_row,
    add_usage,
    collected_on_chain,
    make_worker,
    settled_events,
    settlement_rows,
)
from tests.settlement.test_worker import assert_collected_once, indebted_payer

SEND_METHOD = "eth_sendRawTransaction"


class SwallowingRelay:
    """Relays JSON-RPC to the chain; a sent transaction reaches the chain but its answer never
    comes back (``sent`` is set, and ``tx_hash`` known, once the chain accepted it)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.sent = asyncio.Event()
        self.tx_hash: str | None = None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        self._http = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post("/", self._relay)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _relay(self, request: web.Request) -> web.Response:
        assert self._http is not None
        body = await request.read()
        call = await request.json()
        async with self._http.post(self.upstream, data=body,
                                   headers={"Content-Type": "application/json"}) as answer:
            payload = await answer.read()
            status = answer.status
        if call.get("method") == SEND_METHOD:
            self.tx_hash = str(orjson.loads(payload)["result"])
            self.sent.set()
            await asyncio.Event().wait()  # the worker dies before it hears back
        return web.Response(body=payload, status=status, content_type="application/json")


@pytest.fixture
async def relay(dev_chain: DevChain) -> AsyncIterator[SwallowingRelay]:
    relay = SwallowingRelay(dev_chain.url)
    yield relay
    await relay.stop()


async def test_killed_after_the_send_before_the_hash_was_stored_settles_once(
    engine: AsyncEngine, dev_chain: DevChain, smart_accounts: SmartAccounts,
    relay: SwallowingRelay,
) -> None:
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=420_000)
    assert payer.account_id is not None
    client = await ChainClient.connect(await relay.start(), dev_chain.deployment.chain_id,
                                       call_timeout_s=60, poll_interval_s=0.01)
    try:
        # This worker's own wallet: it dies with the worker, as a process's would.
        doomed = make_worker(engine, dev_chain, client=client,
                             operator=OperatorWallet(client, Account.from_key(ANVIL_OPERATOR_KEY)))
        task = asyncio.create_task(doomed.run_pass())
        await asyncio.wait_for(relay.sent.wait(), timeout=20)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await client.close()
    rows = await settlement_rows(engine, payer.account_id)
    assert [(r["status"], r["tx_hash"]) for r in rows] == [("pending", None)]
    assert relay.tx_hash is not None
    await dev_chain.client.wait_for_receipt(relay.tx_hash)  # anvil mines it just after
    assert await collected_on_chain(dev_chain, payer) == 420_000, "the chain collected"
    assert (await account_row(engine, payer.account_id))["paid_micros"] == 0

    # A fresh worker finds the collection by its reference and confirms it; again, nothing.
    for _ in range(2):
        report = await make_worker(engine, dev_chain).run_pass()
        assert report.ok, report
        await assert_collected_once(engine, dev_chain, payer, 420_000)


async def test_sent_but_not_confirmed_is_confirmed_once_by_the_next_worker(
    engine: AsyncEngine, dev_chain: DevChain, smart_accounts: SmartAccounts,
) -> None:
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=150_000)
    first = make_worker(engine, dev_chain)
    opened, errors = await first.open_collections(await first.contract.head())
    assert errors == 0 and len(opened) >= 1
    assert payer.account_id is not None
    [row] = await settlement_rows(engine, payer.account_id)
    step = await first.advance(row["id"])  # sends and stores the hash
    assert step.outcome is Outcome.PENDING and step.tx_hash is not None
    del first  # killed before it confirmed anything

    [row] = await settlement_rows(engine, payer.account_id)
    assert row["status"] == "pending" and row["tx_hash"] == step.tx_hash
    report = await make_worker(engine, dev_chain).run_pass()
    assert report.ok, report
    await assert_collected_once(engine, dev_chain, payer, 150_000)


async def test_a_pending_row_never_sent_is_sent_once_after_a_restart(
    engine: AsyncEngine, dev_chain: DevChain, smart_accounts: SmartAccounts,
) -> None:
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=175_000)
    first = make_worker(engine, dev_chain)
    await first.open_collections(await first.contract.head())  # ... and dies before sending
    assert payer.account_id is not None
    [row] = await settlement_rows(engine, payer.account_id)
    assert row["status"] == "pending" and row["tx_hash"] is None
    assert await settled_events(dev_chain, row["reference"]) == []

    # While it is pending, no second collection of the account can be opened.
    await add_usage(engine, payer.account_id, 500_000)
    opened, _ = await first.open_collections(await first.contract.head())
    assert row["id"] not in opened
    assert len(await settlement_rows(engine, payer.account_id)) == 1

    report = await make_worker(engine, dev_chain).run_pass()
    assert report.ok, report
    rows = await settlement_rows(engine, payer.account_id)
    assert rows[0]["reference"] == row["reference"] and rows[0]["status"] == "confirmed"
    assert len(await settled_events(dev_chain, row["reference"])) == 1
    # The first was pending when the pass chose accounts, so the new debt waits for the
    # next pass, which collects it under a new reference.
    assert len(rows) == 1
    await make_worker(engine, dev_chain).run_pass()
    rows = await settlement_rows(engine, payer.account_id)
    assert [(r["status"], r["amount_micros"]) for r in rows] == [
        ("confirmed", 175_000), ("confirmed", 500_000)]
    assert rows[1]["reference"] != rows[0]["reference"]
    assert await collected_on_chain(dev_chain, payer) == 675_000
    assert (await account_row(engine, payer.account_id))["paid_micros"] == 675_000


async def test_a_resend_while_the_first_send_waits_to_be_mined_collects_once(
    engine: AsyncEngine, dev_chain: DevChain, smart_accounts: SmartAccounts,
) -> None:
    """The hash of a sent collection is lost while it waits in the pool; the next worker sends
    the same collection again, and the contract refuses the reference the second time."""
    payer = await indebted_payer(engine, dev_chain, smart_accounts, debt_micros=210_000)
    assert payer.account_id is not None
    first = make_worker(engine, dev_chain)
    await first.open_collections(await first.contract.head())
    [row] = await settlement_rows(engine, payer.account_id)
    await smart_accounts.anvil("evm_setAutomine", [False])
    try:
        sent = await first.advance(row["id"])
        assert sent.tx_hash is not None
        await forget_tx_hash(engine, row["id"])  # the kill came before the commit
        resent = await make_worker(engine, dev_chain).advance(row["id"])
        assert resent.outcome is Outcome.PENDING
        assert resent.tx_hash is not None and resent.tx_hash != sent.tx_hash
        await smart_accounts.anvil("evm_mine", [])
    finally:
        await smart_accounts.anvil("evm_setAutomine", [True])
    receipt = await dev_chain.client.receipt(resent.tx_hash)
    assert receipt is not None and receipt["status"] == 0, "the second use of the ref reverted"

    report = await make_worker(engine, dev_chain).run_pass()
    assert report.ok, report
    await assert_collected_once(engine, dev_chain, payer, 210_000)
    [row] = await settlement_rows(engine, payer.account_id)
    assert row["tx_hash"] == sent.tx_hash, "confirmed with the transaction that collected"


async def forget_tx_hash(engine: AsyncEngine, settlement_id: int) -> None:
    async with engine.begin() as connection:
        await connection.execute(update(settlements).where(settlements.c.id == settlement_id)
                                 .values(tx_hash=None))
