"""The reconciliation report over HTTP: the same report as ``tollgate reconcile``, read
through the app's own database engine and chain client.

Failures that stop the report become API errors here: the chain or the database down is
503, a block range the operator chose badly is 400.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from app.chain.config import ChainConfig
from app.chain.errors import ChainError
from app.errors import InvalidRequest, ServiceUnavailable
from app.http.keys import CHAIN, DATABASE
from app.identity.session_store import database_errors
from app.reconcile.chain_logs import ChainLogs
from app.reconcile.errors import ChainHistoryUnavailable, TooMuchToReconcile
from app.reconcile.reconciler import BlockRangeInvalid, reconcile
from app.reconcile.report import Report


class Reconciliation:
    """Runs reports for one app; remembers where the settlement contract was deployed,
    which never changes, so the search for it runs once per process."""

    def __init__(self, chain: ChainConfig | None) -> None:
        self.chain = chain
        self._start_block: int | None = None
        self._start_lock = asyncio.Lock()

    async def report(self, app: web.Application, *, from_block: int | None,
                     to_block: int | None) -> Report:
        client = app.get(CHAIN)
        logs = None
        if self.chain is not None and client is not None:
            logs = ChainLogs(client, settlement=self.chain.settlement, token=self.chain.token)
        try:
            with database_errors():
                if logs is not None and from_block is None:
                    from_block = await self._deployment_block(logs)
                return await reconcile(app[DATABASE], logs, from_block=from_block,
                                       to_block=to_block)
        except ChainHistoryUnavailable as error:
            raise ServiceUnavailable(f"{error} (from_block)",
                                     code="chain_history_unavailable") from None
        except ChainError as error:
            raise ServiceUnavailable(f"the chain cannot be read: {type(error).__name__}",
                                     code="chain_unavailable") from None
        except (BlockRangeInvalid, TooMuchToReconcile) as error:
            raise InvalidRequest(str(error), param="from_block", code="invalid_block_range"
                                 ) from None

    async def _deployment_block(self, logs: ChainLogs) -> int:
        async with self._start_lock:
            if self._start_block is None:
                self._start_block = await logs.deployment_block(await logs.latest_block())
            return self._start_block


RECONCILIATION = web.AppKey("admin_reconciliation", Reconciliation)
