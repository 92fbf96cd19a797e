"""The in-process settlement loop: one pass at start (restart recovery), then one per interval.

A pass that fails (the database or the chain is down) is logged and the next one tries again;
a broken invariant (``AssertionError``) stops the loop loudly instead, since carrying on
could move money on a wrong belief. Stopping cancels the pass in progress: the worker is
built to be killed at any point (see ``app.settlement.worker``), so nothing waits for a
confirmation at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app.settlement.worker import PassReport, SettlementWorker

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 60.0


class SettlementLoop:
    """Runs ``worker.run_pass`` every ``interval_s`` in a task of its own."""

    def __init__(self, worker: SettlementWorker, *, interval_s: float = DEFAULT_INTERVAL_S
                 ) -> None:
        assert interval_s > 0
        self.worker = worker
        self.interval_s = interval_s
        self.passes_completed = 0
        self.last_report: PassReport | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Condition()

    def start(self) -> None:
        assert self._task is None, "started twice"
        self._task = asyncio.create_task(self._run(), name="settlement-loop")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        # The loop's own failure was logged where it happened.
        with contextlib.suppress(asyncio.CancelledError, AssertionError):
            await self._task
        self._task = None

    async def wait_for_passes(self, count: int) -> PassReport:
        """Wait until ``count`` passes have completed since start; the last one's report."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.passes_completed >= count)
        assert self.last_report is not None
        return self.last_report

    async def _run(self) -> None:
        while True:
            try:
                report = await self.worker.run_pass()
            except AssertionError:
                log.critical("settlement loop stopped: an invariant does not hold",
                             exc_info=True)
                raise
            except Exception:
                log.exception("settlement pass failed; the next one retries")
                report = PassReport(errors=1)
            else:
                if report.opened or report.confirmed or report.failed or report.errors:
                    log.info("settlement pass: %s", report.summary())
            async with self._progress:
                self.passes_completed += 1
                self.last_report = report
                self._progress.notify_all()
            await asyncio.sleep(self.interval_s)
