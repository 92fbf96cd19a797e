"""Installs the ledger: the usage recorder, the record stage, the account-holder routes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from app.http.keys import DATABASE, METRICS, SETTINGS
from app.ledger.recorder import UsageRecorder
from app.ledger.stage import LedgerStage
from app.proxy.pipeline import Stage

RECORDER = web.AppKey("usage_recorder", UsageRecorder)


def setup_ledger(app: web.Application) -> Stage:
    from app.ledger import routes  # imports identity; kept local to avoid import cycles

    stage = LedgerStage(app[SETTINGS], app[METRICS])

    async def recorder_context(app: web.Application) -> AsyncIterator[None]:
        recorder = UsageRecorder(app[DATABASE])
        recorder.start()
        app[RECORDER] = recorder
        stage.recorder = recorder
        yield
        # Shutdown waits for in-flight settlements first (on_shutdown), so the queue
        # holds everything that will ever be written.
        await recorder.stop()

    app.cleanup_ctx.append(recorder_context)
    app.router.add_get("/v1/account", routes.get_account)
    app.router.add_get("/v1/usage", routes.list_usage)
    return stage
