"""x402 through HTTP: a real Tollgate on the dev chain, paid by the official x402 client,
settled on chain through the settlement contract, credited once."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import select
from x402 import x402Client, x402ClientSync
from x402.http.clients import x402HttpxClient
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)
from x402.mechanisms.evm.exact import ExactEvmScheme

from app.chain.contracts import bind_contract
from app.config.catalog import Catalog
from app.http.app import Backends
from app.storage.database import create_engine
from app.storage.tables import accounts, payments
from tests.conftest import DevChain, RunningTollgate, make_settings, start_tollgate

MIN_TOPUP = 200_000  # 0.2 test USDC
FUNDS = 10_000_000  # 10 test USDC per payer
CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16}


@pytest.fixture(scope="module")
async def paid_tollgate(catalog: Catalog, backends: Backends, dev_chain: DevChain
                        ) -> AsyncIterator[RunningTollgate]:
    settings = make_settings(x402_min_topup_micros=MIN_TOPUP)
    running = await start_tollgate(
        settings, catalog, Backends(backends.database_url, backends.redis_url,
                                    chain=dev_chain.config()))
    yield running
    await running.runner.cleanup()


async def funded_payer(dev_chain: DevChain) -> LocalAccount:
    payer: LocalAccount = Account.create()
    usdc = bind_contract(dev_chain.client.w3, "TestUSDC", dev_chain.deployment.token)
    tx = await dev_chain.wallet.transact(usdc.functions.mint(payer.address, FUNDS))
    await dev_chain.client.wait_for_receipt(tx)
    return payer


def spend_controls(dev_chain: DevChain) -> Any:
    return {"allowed_assets": [{"network": "eip155:31337", "asset": dev_chain.deployment.token,
                                "max_amount_per_payment": str(FUNDS)}]}


async def usdc_balance(dev_chain: DevChain, who: str) -> int:
    usdc = bind_contract(dev_chain.client.w3, "TestUSDC", dev_chain.deployment.token)
    return int(await dev_chain.client.read(usdc.functions.balanceOf(who)))


async def ledger_for(postgres_url: str, payer: str) -> tuple[list[Any], int]:
    engine = create_engine(postgres_url)
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(
                select(payments).where(payments.c.payer == payer.lower()))).all()
            paid = (await connection.execute(
                select(accounts.c.paid_micros).where(accounts.c.smart_account == payer.lower())
            )).scalar_one_or_none()
    finally:
        await engine.dispose()
    return list(rows), int(paid or 0)


async def test_a_request_without_credentials_is_asked_to_pay(
    paid_tollgate: RunningTollgate, dev_chain: DevChain,
) -> None:
    async with aiohttp.ClientSession() as http, \
            http.post(f"{paid_tollgate.v1}/chat/completions", json=CHAT) as response:
        body = await response.json()
        assert response.status == 402
        required = decode_payment_required_header(response.headers["PAYMENT-REQUIRED"])
    assert required.x402_version == 2
    assert required.model_dump(by_alias=True, exclude_none=True, mode="json") == body
    (accepted,) = required.accepts
    assert accepted.scheme == "exact" and accepted.network == "eip155:31337"
    assert accepted.asset == dev_chain.deployment.token
    assert accepted.pay_to == dev_chain.deployment.settlement
    assert int(accepted.amount) >= MIN_TOPUP
    assert accepted.extra == {"name": "USD Coin", "version": "2"}


async def test_official_x402_client_pays_and_gets_its_completion(
    paid_tollgate: RunningTollgate, dev_chain: DevChain, postgres_url: str,
) -> None:
    payer = await funded_payer(dev_chain)
    client = x402Client().set_spend_controls(spend_controls(dev_chain))
    client.register("eip155:31337", ExactEvmScheme(payer))
    settlement_before = await usdc_balance(dev_chain, dev_chain.deployment.settlement)
    async with x402HttpxClient(client, timeout=60) as http:
        response = await http.post(f"{paid_tollgate.v1}/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    receipt = decode_payment_response_header(response.headers["PAYMENT-RESPONSE"])
    assert receipt.success and receipt.payer == payer.address.lower()
    assert receipt.transaction.startswith("0x") and receipt.network == "eip155:31337"
    # The payment reached the settlement contract and the ledger, once.
    assert await usdc_balance(dev_chain, payer.address) == FUNDS - MIN_TOPUP
    assert await usdc_balance(dev_chain, dev_chain.deployment.settlement) == \
        settlement_before + MIN_TOPUP
    rows, paid = await ledger_for(postgres_url, payer.address)
    assert [(row.status, row.amount_micros, row.tx_hash) for row in rows] == \
        [("confirmed", MIN_TOPUP, receipt.transaction)]
    assert paid == MIN_TOPUP
    # The request was billed against the credit the payment bought.
    assert int(response.headers["X-Tollgate-Cost"]) > 0


def payment_header(dev_chain: DevChain, payer: LocalAccount, required: Any) -> str:
    client = x402ClientSync().set_spend_controls(spend_controls(dev_chain))
    client.register("eip155:31337", ExactEvmScheme(payer))
    return encode_payment_signature_header(client.create_payment_payload(required))


async def ask(http: aiohttp.ClientSession, tollgate: RunningTollgate) -> Any:
    async with http.post(f"{tollgate.v1}/chat/completions", json=CHAT) as response:
        assert response.status == 402
        return decode_payment_required_header(response.headers["PAYMENT-REQUIRED"])


async def pay(http: aiohttp.ClientSession, tollgate: RunningTollgate, header: str
              ) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{tollgate.v1}/chat/completions", json=CHAT,
                         headers={"PAYMENT-SIGNATURE": header}) as response:
        return response.status, await response.json()


async def test_a_replayed_payment_is_accepted_once_sequentially_and_concurrently(
    paid_tollgate: RunningTollgate, dev_chain: DevChain, postgres_url: str,
) -> None:
    payer = await funded_payer(dev_chain)
    async with aiohttp.ClientSession() as http:
        header = payment_header(dev_chain, payer, await ask(http, paid_tollgate))
        outcomes = await asyncio.gather(*(pay(http, paid_tollgate, header) for _ in range(6)))
        later = await pay(http, paid_tollgate, header)
    statuses = sorted(status for status, _ in outcomes)
    assert statuses.count(200) == 1, outcomes
    refused = [body for status, body in [*outcomes, later] if status != 200]
    assert {body["error"] for body in refused} == {
        "payment refused: this authorization was already used; it was credited once"}
    rows, paid = await ledger_for(postgres_url, payer.address)
    assert len(rows) == 1 and rows[0].status == "confirmed" and paid == MIN_TOPUP
    assert await usdc_balance(dev_chain, payer.address) == FUNDS - MIN_TOPUP


def retouched(header: str, change: Any) -> str:
    document = json.loads(base64.b64decode(header))
    change(document)
    return base64.b64encode(json.dumps(document).encode()).decode()


@pytest.mark.parametrize(("change", "status", "reason"), [
    # Forged: a signature that is not the payer's, or terms changed after signing.
    (lambda d: d["payload"].update(signature="0x" + "11" * 65), 402, "not the payer's"),
    (lambda d: d["payload"]["authorization"].update(value="900000"), 402, "not the payer's"),
    (lambda d: d["payload"]["authorization"].update(validBefore="1000"), 402, "validBefore"),
    (lambda d: d["payload"]["authorization"].update(to="0x" + "44" * 20), 402,
     "must pay " + "0x"),
    (lambda d: d["accepted"].update(network="eip155:8453"), 402, "network must be"),
    (lambda d: d["accepted"].update(asset="0x" + "55" * 20), 402, "asset must be"),
    (lambda d: d["accepted"].update(payTo="0x" + "66" * 20), 402, "payTo must be"),
    (lambda d: d["payload"].update(signature=d["payload"]["signature"] + "6492" * 16), 402,
     "undeployed smart account"),
    (lambda d: d.update(payload=[]), 400, "invalid_payment"),
])
async def test_unacceptable_payments_get_the_right_status_and_reason(
    paid_tollgate: RunningTollgate, dev_chain: DevChain, postgres_url: str, change: Any,
    status: int, reason: str,
) -> None:
    payer = await funded_payer(dev_chain)
    async with aiohttp.ClientSession() as http:
        header = retouched(payment_header(dev_chain, payer, await ask(http, paid_tollgate)),
                           change)
        async with http.post(f"{paid_tollgate.v1}/chat/completions", json=CHAT,
                             headers={"PAYMENT-SIGNATURE": header}) as response:
            body = await response.json()
            assert response.status == status, body
            if status == 402:
                # A refusal asks again: the payer can retry with a good payment.
                required = decode_payment_required_header(response.headers["PAYMENT-REQUIRED"])
                assert required.error == body["error"] and reason in body["error"]
                assert int(required.accepts[0].amount) >= MIN_TOPUP
            else:
                assert body["error"]["code"] == reason
    rows, paid = await ledger_for(postgres_url, payer.address)
    assert rows == [] and paid == 0
    assert await usdc_balance(dev_chain, payer.address) == FUNDS


async def test_an_amount_below_what_is_asked_is_refused(
    paid_tollgate: RunningTollgate, dev_chain: DevChain,
) -> None:
    payer = await funded_payer(dev_chain)
    async with aiohttp.ClientSession() as http:
        required = await ask(http, paid_tollgate)
        required.accepts[0].amount = str(MIN_TOPUP - 1)
        header = payment_header(dev_chain, payer, required)
        status, body = await pay(http, paid_tollgate, header)
    assert status == 402 and "at least" in body["error"]


async def test_garbage_payment_headers_are_400(paid_tollgate: RunningTollgate) -> None:
    async with aiohttp.ClientSession() as http:
        for header in ("%%%", base64.b64encode(b"{not json").decode(), "e30="):
            status, body = await pay(http, paid_tollgate, header)
            assert status == 400, body
            assert body["error"]["param"] == "PAYMENT-SIGNATURE"
