"""Hot statements, run directly on the pooled connection's asyncpg driver.

Every chat call runs two ledger statements (the hold, then the record that
resolves it), and a session's row is read on a cache miss. Through SQLAlchemy's
execution layers one such statement cost 2.0 ms at c=1 (``BEGIN``, the
statement and ``ROLLBACK``: three round trips), directly on the driver 0.85 ms,
so they bypass those layers: the
pool still hands out and takes back the connection, asyncpg prepares each
statement once per connection (its statement cache) and runs it outside any
explicit transaction, so one statement is one transaction. Table and column
names in the SQL still come from the SQLAlchemy metadata.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine


async def fetch(engine: AsyncEngine, statement: str, *arguments: Any) -> list[Any]:
    """Run one statement (its own transaction) and return its rows (asyncpg Records)."""
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        try:
            return list(await driver.fetch(statement, *arguments))
        except BaseException:
            # Errors from the driver bypass SQLAlchemy's own detection, and after a
            # terminated backend asyncpg can fail with any of several exception
            # types. A connection that saw an error is never trusted again: it is
            # closed, not returned to the pool. Errors are rare; a reconnect is cheap.
            await connection.invalidate()
            raise
