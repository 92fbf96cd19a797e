"""Pending payments are finished from the chain, without the payer coming back."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from app.config.catalog import Catalog
from app.http.app import Backends
from app.payments import ledger
from app.payments.recovery import resume_pending
from app.payments.setup import PAYMENTS
from tests.conftest import DevChain, RunningTollgate, make_settings, start_tollgate
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

DEEP = 4  # confirmations this Tollgate waits for


@pytest.fixture(scope="module")
async def deep_tollgate(catalog: Catalog, backends: Backends, dev_chain: DevChain
                        ) -> AsyncIterator[RunningTollgate]:
    running = await start_tollgate(
        make_settings(x402_min_topup_micros=MIN_TOPUP), catalog,
        Backends(backends.database_url, backends.redis_url,
                 chain=dev_chain.config(confirmations=DEEP)))
    # Confirmations are waited for briefly, so the request gives up while the
    # transaction is mined but not yet deep enough.
    running.app[PAYMENTS].receipt_timeout_s = 0.3
    yield running
    await running.runner.cleanup()


async def mine(dev_chain: DevChain, blocks: int) -> None:
    for _ in range(blocks):
        await dev_chain.client.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


async def test_a_payment_whose_confirmation_timed_out_is_confirmed_later(
    deep_tollgate: RunningTollgate, dev_chain: DevChain, postgres_url: str,
) -> None:
    payer = await funded_payer(dev_chain)
    async with aiohttp.ClientSession() as http:
        header = payment_header(dev_chain, payer, await ask(http, deep_tollgate))
        status, body = await pay(http, deep_tollgate, header)
    assert status == 503 and body["error"]["code"] == "payment_pending", body
    rows, paid = await ledger_for(postgres_url, payer.address)
    assert [row.status for row in rows] == ["pending"] and rows[0].tx_hash and paid == 0
    # The money moved on chain; the ledger catches up once the block is deep enough.
    assert await usdc_balance(dev_chain, payer.address) == FUNDS - MIN_TOPUP
    service = deep_tollgate.app[PAYMENTS]
    # Other tests' payments share the database: this one is what is looked at.
    await resume_pending(service, older_than_s=0)
    rows, paid = await ledger_for(postgres_url, payer.address)
    assert [row.status for row in rows] == ["pending"] and paid == 0, "not deep enough yet"
    await mine(dev_chain, DEEP)
    resumed = await resume_pending(service, older_than_s=0)
    assert resumed.confirmed >= 1
    rows, paid = await ledger_for(postgres_url, payer.address)
    assert [row.status for row in rows] == ["confirmed"] and paid == MIN_TOPUP
    # A second pass changes nothing: a payment is credited once.
    await resume_pending(service, older_than_s=0)
    assert (await ledger_for(postgres_url, payer.address))[1] == MIN_TOPUP


async def test_an_unsent_payment_whose_authorization_expired_is_failed(
    deep_tollgate: RunningTollgate, dev_chain: DevChain, postgres_url: str,
) -> None:
    payer = await funded_payer(dev_chain)
    service = deep_tollgate.app[PAYMENTS]
    account_id = await ledger.payer_account(service.engine, service.asset.chain_id,
                                            payer.address)
    reference = "0x" + secrets.token_hex(32)
    assert await ledger.record_pending(service.engine, ledger.NewPayment(
        reference=reference, account_id=account_id, chain_id=service.asset.chain_id,
        asset=service.asset.address, payer=payer.address, nonce="0x" + secrets.token_hex(32),
        amount_micros=MIN_TOPUP, method="onchain", valid_before_s=int(time.time()) - 1,
    ))
    resumed = await resume_pending(service, older_than_s=0)
    assert resumed.failed >= 1
    row = await ledger.find(service.engine, reference)
    assert row is not None and row.status == "failed"
    assert row.failure_reason == "the authorization expired before it was settled"
    assert (await ledger_for(postgres_url, payer.address))[1] == 0
