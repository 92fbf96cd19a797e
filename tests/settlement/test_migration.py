"""Migration 0005 creates exactly the vouchers table that ``app.storage.tables`` declares,
and goes down and up again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage.database import alembic_config, create_engine, migrate
from app.storage.tables import metadata, vouchers
from tests.ledger.test_migration import scratch_url

__all__ = ["scratch_url"]  # the fixture, reused


def _vouchers_only(item: object, name: str | None, kind: str, reflected: bool,
                   compare_to: object) -> bool:
    table = item if kind == "table" else getattr(item, "table", None)
    return getattr(table, "name", None) == vouchers.name


async def differences(engine: AsyncEngine) -> list[object]:
    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: compare_metadata(
            MigrationContext.configure(sync, opts={"include_object": _vouchers_only}),
            metadata))


async def has_vouchers(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: inspect(sync).has_table(vouchers.name))


@pytest.fixture
async def scratch_engine(scratch_url: str) -> AsyncIterator[AsyncEngine]:
    await asyncio.to_thread(migrate, scratch_url)
    engine = create_engine(scratch_url)
    yield engine
    await engine.dispose()


async def test_down_and_up_again(scratch_url: str, scratch_engine: AsyncEngine) -> None:
    assert await differences(scratch_engine) == []
    await asyncio.to_thread(command.downgrade, alembic_config(scratch_url), "0004")
    assert not await has_vouchers(scratch_engine)
    await asyncio.to_thread(migrate, scratch_url)
    assert await differences(scratch_engine) == []
