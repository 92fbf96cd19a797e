"""The operator's API over HTTP: its token, the accounts, credit limits, revocation and the
reconciliation report."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config.catalog import Catalog
from app.http.app import Backends
from app.reconcile.render import CSV_COLUMNS
from app.storage.database import create_engine
from app.storage.tables import settlements
from tests.conftest import RunningTollgate, make_settings, start_tollgate
from tests.identity.wallets import authorize, bearer
from tests.reconcile.world import (
    World,
    new_account,
    new_reference,
    paid_on_chain,
    record_payment,
)

ADMIN_TOKEN = "operator-" + "7" * 40
OPERATOR = bearer(ADMIN_TOKEN)


@pytest.fixture(scope="module")
async def admin(catalog: Catalog, backends: Backends) -> AsyncIterator[RunningTollgate]:
    """A Tollgate with an admin token, on the session's shared Postgres and Redis."""
    running = await start_tollgate(make_settings(admin_token=ADMIN_TOKEN), catalog, backends)
    yield running
    await running.runner.cleanup()


@pytest.fixture(scope="module")
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url)
    yield engine
    await engine.dispose()


async def call(http: aiohttp.ClientSession, method: str, url: str,
               headers: dict[str, str] | None = None, **options: Any
               ) -> tuple[int, Any]:
    async with http.request(method, url, headers=OPERATOR if headers is None else headers,
                            **options) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


def assert_error(answer: Any, error_type: str, code: str, param: str | None = None) -> None:
    assert set(answer) == {"error"}
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert (answer["error"]["type"], answer["error"]["code"]) == (error_type, code), answer
    assert answer["error"]["param"] == param, answer


ENDPOINTS = (
    ("GET", "/v1/admin/accounts"), ("GET", "/v1/admin/accounts/acct_1"),
    ("PATCH", "/v1/admin/accounts/acct_1"), ("POST", "/v1/admin/accounts/acct_1/revoke-sessions"),
    ("GET", "/v1/admin/reconciliation"),
)


async def test_every_endpoint_wants_the_operator_token(
    http: aiohttp.ClientSession, admin: RunningTollgate, tollgate: RunningTollgate,
) -> None:
    session = await authorize(http, admin.url)
    for method, path in ENDPOINTS:
        status, answer = await call(http, method, admin.url + path, headers={})
        assert status == 401, (method, path)
        assert_error(answer, "authentication_error", "missing_token")
        for wrong in (bearer("operator-" + "8" * 40), bearer(session["token"])):
            status, answer = await call(http, method, admin.url + path, headers=wrong)
            assert status == 401, (method, path)
            assert_error(answer, "authentication_error", "invalid_admin_token")
        # Without a token configured, the admin API is not there at all.
        status, answer = await call(http, method, tollgate.url + path)
        assert status == 404
        assert_error(answer, "not_found_error", "unknown_url")


async def test_accounts_are_listed_newest_first_page_by_page(
    http: aiohttp.ClientSession, admin: RunningTollgate, engine: AsyncEngine,
) -> None:
    oldest, middle, newest = [await new_account(engine) for _ in range(3)]
    await record_payment(engine, account_id=oldest, reference=new_reference(), amount=200,
                         payer="0x" + "44" * 20, tx_hash="0x" + "44" * 32)
    # Start just after the newest: other tests may add accounts to this shared database.
    url = f"{admin.v1}/admin/accounts"

    status, page = await call(http, "GET", url,
                              params={"limit": "2", "starting_after": f"acct_{newest + 1}"})
    assert status == 200, page
    assert (page["object"], page["has_more"]) == ("list", True)
    assert [account["id"] for account in page["data"]] == [f"acct_{newest}", f"acct_{middle}"]

    status, page = await call(http, "GET", url,
                              params={"limit": "1", "starting_after": f"acct_{middle}"})
    assert status == 200, page
    (account,) = page["data"]
    assert account["id"] == f"acct_{oldest}"
    assert {key: account[key] for key in (
        "object", "usage_micros", "paid_micros", "balance_micros", "held_micros",
        "credit_limit_micros", "effective_credit_limit_micros", "available_micros",
        "settlement_failed_at", "cost_unit")} == {
        "object": "account", "usage_micros": 0, "paid_micros": 200, "balance_micros": -200,
        "held_micros": 0, "credit_limit_micros": 0, "effective_credit_limit_micros": 0,
        "available_micros": 200, "settlement_failed_at": None, "cost_unit": "usd_micros"}
    assert account["wallet"] == account["smart_account"]

    for params, param in (({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"),
                          ({"limit": "x"}, "limit"), ({"starting_after": "7"}, "starting_after"),
                          ({"starting_after": "acct_x"}, "starting_after")):
        status, answer = await call(http, "GET", url, params=params)
        assert status == 400, params
        assert_error(answer, "invalid_request_error", "invalid_value", param)


async def test_an_account_with_its_payments_and_settlements(
    http: aiohttp.ClientSession, admin: RunningTollgate, engine: AsyncEngine,
) -> None:
    account_id = await new_account(engine)
    payment_reference, settlement_reference = new_reference(), new_reference()
    await record_payment(engine, account_id=account_id, reference=payment_reference,
                         amount=1_000, payer="0x" + "55" * 20, tx_hash=None, status="pending")
    async with engine.begin() as connection:
        await connection.execute(insert(settlements).values(
            reference=settlement_reference, account_id=account_id, chain_id=31337,
            amount_micros=300, smart_account="0x" + "66" * 20, session_key="0x" + "77" * 20,
            cumulative_micros=300))

    status, account = await call(http, "GET", f"{admin.v1}/admin/accounts/acct_{account_id}")

    assert status == 200, account
    assert account["id"] == f"acct_{account_id}"
    (payment,) = account["payments"]["data"]
    assert (payment["object"], payment["reference"], payment["status"],
            payment["amount_micros"]) == ("payment", payment_reference, "pending", 1_000)
    (settlement,) = account["settlements"]["data"]
    assert (settlement["object"], settlement["reference"], settlement["cumulative_micros"],
            settlement["session_key"]) == ("settlement", settlement_reference, 300,
                                           "0x" + "77" * 20)
    assert account["payments"]["has_more"] is account["settlements"]["has_more"] is False

    for missing in (f"acct_{2**62}", "acct_0", "acct_x", str(account_id), "cus_1"):
        status, answer = await call(http, "GET", f"{admin.v1}/admin/accounts/{missing}")
        assert status == 404, missing
        assert_error(answer, "not_found_error", "account_not_found", "id")


async def test_the_operator_sets_a_credit_limit(
    http: aiohttp.ClientSession, admin: RunningTollgate, engine: AsyncEngine,
) -> None:
    account_id = await new_account(engine)
    url = f"{admin.v1}/admin/accounts/acct_{account_id}"

    status, account = await call(http, "PATCH", url, json={"credit_limit_micros": 7_500_000})
    assert status == 200, account
    assert (account["credit_limit_micros"], account["available_micros"]) == (
        7_500_000, 7_500_000)
    status, account = await call(http, "GET", url)
    assert account["credit_limit_micros"] == 7_500_000

    refused: tuple[tuple[object, str, str | None], ...] = (
        ({"credit_limit_micros": -1}, "invalid_value", "credit_limit_micros"),
        ({"credit_limit_micros": 10**12 + 1}, "invalid_value", "credit_limit_micros"),
        ({"credit_limit_micros": "5"}, "invalid_value", "credit_limit_micros"),
        ({"credit_limit_micros": 1.5}, "invalid_value", "credit_limit_micros"),
        ({"credit_limit_micros": True}, "invalid_value", "credit_limit_micros"),
        ({"credit_limit_micros": None}, "invalid_value", "credit_limit_micros"),
        ({}, "missing_parameter", "credit_limit_micros"),
        ({"credit_limit_micros": 1, "status": "active"}, "unknown_parameter", "status"),
        ([1], "invalid_json", None),
    )
    for body, code, param in refused:
        status, answer = await call(http, "PATCH", url, json=body)
        assert status == 400, body
        assert_error(answer, "invalid_request_error", code, param)
    status, answer = await call(http, "PATCH", url, data=b"{not json")
    assert status == 400
    assert_error(answer, "invalid_request_error", "invalid_json")
    status, answer = await call(http, "PATCH", url, data=b" " * 5000)
    assert status == 413
    status, account = await call(http, "GET", url)
    assert account["credit_limit_micros"] == 7_500_000  # no refused value got through

    status, answer = await call(http, "PATCH", f"{admin.v1}/admin/accounts/acct_{2**62}",
                                json={"credit_limit_micros": 1})
    assert status == 404
    assert_error(answer, "not_found_error", "account_not_found", "id")


async def test_revoking_an_accounts_sessions_refuses_its_tokens(
    http: aiohttp.ClientSession, admin: RunningTollgate,
) -> None:
    issued = await authorize(http, admin.url)
    token, account = issued["token"], issued["account"]["id"]
    status, _ = await call(http, "GET", f"{admin.v1}/account", headers=bearer(token))
    assert status == 200

    status, answer = await call(http, "POST",
                                f"{admin.v1}/admin/accounts/{account}/revoke-sessions")

    assert status == 200, answer
    assert answer == {"object": "session.revocation", "account": account,
                      "revoked": [issued["sessionId"]]}
    status, answer = await call(http, "GET", f"{admin.v1}/account", headers=bearer(token))
    assert status == 401
    assert_error(answer, "authentication_error", "token_revoked")
    status, answer = await call(http, "POST",
                                f"{admin.v1}/admin/accounts/acct_{2**62}/revoke-sessions")
    assert status == 404


async def test_reconciliation_without_a_chain_checks_the_ledger(
    http: aiohttp.ClientSession, admin: RunningTollgate,
) -> None:
    url = f"{admin.v1}/admin/reconciliation"
    status, report = await call(http, "GET", url)
    assert status == 200, report
    assert report["object"] == "reconciliation"
    assert report["chain"]["checked"] is False
    assert "only the ledger's invariants were checked" in report["chain"]["skipped"]
    assert report["findings"] == []

    status, text_body = await call(http, "GET", url, params={"format": "csv"})
    assert status == 200
    assert next(csv.reader(io.StringIO(text_body))) == list(CSV_COLUMNS)

    status, answer = await call(http, "GET", url, params={"format": "xml"})
    assert status == 400
    assert_error(answer, "invalid_request_error", "invalid_value", "format")


async def test_reconciliation_reads_the_chain_the_app_bills_on(
    http: aiohttp.ClientSession, catalog: Catalog, redis_url: str, world: World,
) -> None:
    payer, reference, tx_hash = await paid_on_chain(world, 3_000_000)
    account_id = await new_account(world.engine, payer.address)
    await record_payment(world.engine, account_id=account_id, reference=reference,
                         amount=3_000_000, payer=payer.address, tx_hash=tx_hash)
    running = await start_tollgate(
        make_settings(admin_token=ADMIN_TOKEN), catalog,
        Backends(world.database_url, redis_url, chain=world.chain_config()))
    url = f"{running.v1}/admin/reconciliation"
    try:
        status, report = await call(http, "GET", url)
        assert status == 200, report
        assert report["reconciles"] is True
        assert report["chain"]["checked"] is True
        assert report["chain"]["from_block"] > 0  # the settlement's deployment block
        (finding,) = report["findings"]
        assert (finding["category"], finding["reference"], finding["chain_tx_hash"]) == (
            "matched", reference, tx_hash)

        await _tamper(world.engine, reference)
        status, body = await call(http, "GET", url, params={"format": "csv"})
        assert status == 200
        rows = list(csv.DictReader(io.StringIO(body)))
        assert {(row["section"], row["category"]) for row in rows} == {
            ("finding", "amount_mismatch"), ("invariant", "paid_total")}

        latest = await world.client.block_number()
        for params, code in (({"from_block": "x"}, "invalid_value"),
                             ({"from_block": str(latest + 1)}, "invalid_block_range"),
                             ({"from_block": "5", "to_block": "4"}, "invalid_block_range")):
            status, answer = await call(http, "GET", url, params=params)
            assert status == 400, params
            assert_error(answer, "invalid_request_error", code, "from_block")
    finally:
        await running.runner.cleanup()


async def _tamper(engine: AsyncEngine, reference: str) -> None:
    async with engine.begin() as connection:
        await connection.execute(text(
            "UPDATE payments SET amount_micros = amount_micros + 1 WHERE reference = :r"),
            {"r": reference})

