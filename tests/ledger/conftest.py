from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.http.keys import PIPELINE
from app.ledger.stage import LedgerStage
from app.storage.database import create_engine
from app.storage.tables import accounts, holds, usage_records
from tests.identity.wallets import authorize, bearer

_addresses = itertools.count(1)


@pytest.fixture(scope="session")
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url)
    yield engine
    await engine.dispose()


async def make_account(engine: AsyncEngine, credit_limit_micros: int = 10_000_000) -> int:
    """A fresh account row (ledger tests need no wallet signature)."""
    address = f"0x{next(_addresses):040x}"
    async with engine.begin() as connection:
        result = await connection.execute(
            insert(accounts).values(chain_id=999, smart_account=address, wallet=address,
                                    credit_limit_micros=credit_limit_micros)
            .returning(accounts.c.id)
        )
        return int(result.scalar_one())


@dataclass(frozen=True)
class Payer:
    """A fresh account signed in over HTTP, with its id for looking at its rows."""

    account_id: int
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)


async def sign_in(base_url: str) -> Payer:
    async with aiohttp.ClientSession() as http:
        answer = await authorize(http, base_url)
    return Payer(int(answer["account"]["id"].removeprefix("acct_")), answer["token"])


async def set_account(engine: AsyncEngine, account_id: int, **values: Any) -> None:
    """Set columns an operator or the settlement worker would (credit limit, payments, flag)."""
    async with engine.begin() as connection:
        await connection.execute(
            update(accounts).where(accounts.c.id == account_id).values(**values))


async def account_row(engine: AsyncEngine, account_id: int) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(
            select(accounts).where(accounts.c.id == account_id))).mappings().one()


async def open_holds(engine: AsyncEngine, account_id: int) -> dict[str, int]:
    """The account's open holds: request id -> amount."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(holds.c.request_id, holds.c.amount_micros)
            .where(holds.c.account_id == account_id))
        return {row.request_id: row.amount_micros for row in rows}


async def recorded(engine: AsyncEngine, account_id: int) -> dict[str, Any]:
    """The account's usage records by request id."""
    async with engine.connect() as connection:
        rows = (await connection.execute(
            select(usage_records).where(usage_records.c.account_id == account_id)
        )).mappings().all()
    return {row["request_id"]: row for row in rows}


def ledger_stage(app: web.Application) -> LedgerStage:
    (stage,) = [stage for stage in app[PIPELINE].stages if stage.name == "ledger"]
    assert isinstance(stage, LedgerStage)
    return stage


async def retire_leases(app: web.Application) -> None:
    """Retire a Tollgate's credit leases now (not after their time) and wait for the writes."""
    stage = ledger_stage(app)
    if stage.leases is not None:
        await stage.leases.retire_all()
    assert stage.recorder is not None
    await stage.recorder.writer.queue.join()
