"""Installs the ledger: holds and usage records, the expiry sweep, the account-holder routes.

    money.py      the unit (micro-USD), the rounding rules, pricing a usage
    balance.py    the balance rule: usage - paid + holds + max cost <= credit limit
    holds.py      a call's maximum cost and hold lifetime; the admission statement
    leases.py     credit reserved once for many calls of a busy account
    recorder.py   usage records written and holds resolved together
    group_commit.py  one writer task per kind of write, one statement per batch
    connection.py the writers' own connections
    expiry.py     the periodic release of holds left by crashed processes
    stage.py      the pipeline stage: hold at admit, record or release at settle
    driver.py     running the hot statements on the asyncpg driver
    audit.py      running totals checked against the rows they sum
    routes.py     GET /v1/account, GET /v1/usage
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from app.http.keys import DATABASE, METRICS, SETTINGS
from app.ledger.expiry import HoldSweeper
from app.ledger.holds import HoldTaker
from app.ledger.leases import CreditLeases
from app.ledger.recorder import UsageRecorder
from app.ledger.stage import LedgerStage
from app.proxy.pipeline import Stage

RECORDER = web.AppKey("usage_recorder", UsageRecorder)
SWEEPER = web.AppKey("hold_sweeper", HoldSweeper)


def setup_ledger(app: web.Application) -> Stage:
    from app.ledger import routes  # imports identity; kept local to avoid import cycles

    stage = LedgerStage(app[SETTINGS], app[METRICS])

    async def ledger_context(app: web.Application) -> AsyncIterator[None]:
        engine = app[DATABASE]
        recorder = UsageRecorder(engine)
        recorder.start()
        holds = HoldTaker(engine)
        holds.start()
        sweeper = HoldSweeper(engine)
        sweeper.start()
        app[RECORDER] = recorder
        app[SWEEPER] = sweeper
        stage.engine = engine
        stage.holds = holds
        stage.recorder = recorder
        lease_s = app[SETTINGS].credit_lease_s
        metrics = app[METRICS]
        stage.leases = CreditLeases(holds, recorder, lease_s,
                                    lambda: metrics.lease_taken("credit")) if lease_s > 0 else None
        yield
        if stage.leases is not None:
            # After in-flight calls settled (on_shutdown): releases are queued for the
            # recorder, which writes them before it stops.
            await stage.leases.retire_all()
        await sweeper.stop()
        await holds.stop()
        # Shutdown waits for in-flight settlements first (on_shutdown), so the queue
        # holds everything that will ever be written.
        await recorder.stop()

    app.cleanup_ctx.append(ledger_context)
    app.router.add_get("/v1/account", routes.get_account)
    app.router.add_get("/v1/usage", routes.list_usage)
    return stage
