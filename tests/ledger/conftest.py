from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage.database import create_engine
from app.storage.tables import accounts

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
