"""A connection of its own for each of the ledger's writer tasks.

The hold taker and the usage recorder each run one statement at a time from one
task, on every request. A pooled connection would cost them a checkout through
SQLAlchemy's pool per statement, and under load they would compete with every
other query for the pool (and churn its overflow connections, each new one
re-preparing the statements). So each writer owns one asyncpg connection, opened
on first use from the engine's own settings, with asyncpg's statement cache
preparing each statement once.

A connection that saw any error is closed and the next statement opens a fresh
one: after a terminated backend asyncpg can fail with any of several exception
types, and a reconnect is cheap next to trusting a broken connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage.database import POOL_TIMEOUT_S, STATEMENT_TIMEOUT_MS


class WriterConnection:
    """One lazily opened asyncpg connection, for one task's statements in sequence."""

    def __init__(self, engine: AsyncEngine, *, name: str, synchronous_commit: bool = True
                 ) -> None:
        _, connect_args = engine.dialect.create_connect_args(engine.url)
        self.connect_args: dict[str, Any] = dict(connect_args)
        self.server_settings = {
            "statement_timeout": str(STATEMENT_TIMEOUT_MS),
            "application_name": f"tollgate-{name}",
            # Off only for writes whose loss in a crash is harmless (see holds.py).
            "synchronous_commit": "on" if synchronous_commit else "off",
        }
        self._connection: asyncpg.Connection | None = None
        # One statement at a time: the owner is one task, but close() may come from another.
        self._lock = asyncio.Lock()

    async def fetch(self, statement: str, *arguments: Any) -> list[Any]:
        """Run one statement (its own transaction) and return its rows."""
        async with self._lock:
            connection = await self._connect()
            try:
                return list(await connection.fetch(statement, *arguments))
            except BaseException:
                self._connection = None
                await _close(connection)
                raise

    async def close(self) -> None:
        async with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                await _close(connection)

    async def _connect(self) -> asyncpg.Connection:
        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(
                **self.connect_args, server_settings=self.server_settings,
                timeout=POOL_TIMEOUT_S,
            )
        return self._connection


async def _close(connection: asyncpg.Connection) -> None:
    # A broken connection may not answer a polite close; it is dropped either way.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), timeout=1.0)
    if not connection.is_closed():
        connection.terminate()
