"""The Postgres engine (SQLAlchemy Core over asyncpg) and schema migrations."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"
POOL_SIZE = 10
POOL_OVERFLOW = 10
POOL_TIMEOUT_S = 5.0
STATEMENT_TIMEOUT_MS = 10_000


def async_url(url: str) -> str:
    """``postgresql://`` (what operators write) to the asyncpg dialect URL."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def create_engine(url: str) -> AsyncEngine:
    return create_async_engine(
        async_url(url),
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        pool_timeout=POOL_TIMEOUT_S,
        # No pre-ping: it costs a round trip per checkout on the hot path; a dead
        # connection fails its statement, is dropped from the pool, and callers retry.
        connect_args={
            "server_settings": {
                "statement_timeout": str(STATEMENT_TIMEOUT_MS),
                "application_name": "tollgate",
            },
            "timeout": POOL_TIMEOUT_S,
        },
    )


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # The URL goes through attributes, not the ini, so '%' in passwords needs no escaping.
    config.attributes["database_url"] = async_url(url)
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (blocking; run before serving)."""
    command.upgrade(alembic_config(url), revision)


async def pending_migrations(engine: AsyncEngine) -> bool:
    """True when the database is behind the code's newest migration."""
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    heads = set(script.get_heads())
    async with engine.connect() as connection:
        current = await connection.run_sync(
            lambda sync: set(MigrationContext.configure(sync).get_current_heads())
        )
    return current != heads


def migrate_in_thread(url: str) -> asyncio.Future[None]:
    """Alembic's async env runs its own event loop, so it needs a thread of its own."""
    return asyncio.get_running_loop().run_in_executor(None, migrate, url)
