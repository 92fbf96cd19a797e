"""Migration 0003 goes down and up again, and leaves the accounts and holds tables.py declares.

Only the tables this migration touches are compared: later migrations may be in
progress in other branches of the code base.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage.database import alembic_config, create_engine, migrate
from app.storage.tables import metadata


@pytest.fixture
async def scratch_url(postgres_url: str) -> AsyncIterator[str]:
    """A database of its own on the session's server, dropped afterwards."""
    name = f"scratch_{secrets.token_hex(4)}"
    server = create_engine(postgres_url)
    admin = server.execution_options(isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f"CREATE DATABASE {name}"))
    yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    async with admin.connect() as connection:
        await connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    await server.dispose()


MIGRATED_TABLES = frozenset({"accounts", "holds"})


def _migrated(item: object, name: str | None, kind: str, reflected: bool,
              compare_to: object) -> bool:
    table = item if kind == "table" else getattr(item, "table", None)
    return getattr(table, "name", None) in MIGRATED_TABLES


async def schema_differences(engine: AsyncEngine) -> list[object]:
    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: compare_metadata(
            MigrationContext.configure(sync, opts={"include_object": _migrated}), metadata))


async def test_down_and_up_again(scratch_url: str) -> None:
    await asyncio.to_thread(migrate, scratch_url)
    engine = create_engine(scratch_url)
    try:
        assert await schema_differences(engine) == []
        async with engine.begin() as connection:
            await connection.execute(text(
                "INSERT INTO accounts (chain_id, smart_account, wallet, credit_limit_micros,"
                " usage_micros) VALUES (1, '0x01', '0x01', 5, 42)"))
        await asyncio.to_thread(command.downgrade, alembic_config(scratch_url), "0002")
        async with engine.connect() as connection:
            debt = (await connection.execute(text("SELECT debt_micros FROM accounts"))).scalar()
        assert debt == 42, "the usage total survives as the old debt column"
        assert len(await schema_differences(engine)) > 5, "the comparison sees 0003's work"
        await asyncio.to_thread(migrate, scratch_url)
        assert await schema_differences(engine) == []
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE accounts SET paid_micros = 1"))
        with pytest.raises(Exception, match="recorded payments"):
            await asyncio.to_thread(command.downgrade, alembic_config(scratch_url), "0002")
    finally:
        await engine.dispose()
