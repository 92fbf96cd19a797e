"""Revocations pushed to every process, so a cached session needs no Redis read per request.

Revoking writes Postgres (the truth), then the revoked-session keys, and
publishes each revoked jti on ``REVOCATIONS_CHANNEL`` (``RevocationList.publish``).
Every process subscribes; a message drops that session's cached row, so its
next request is checked in full (Redis, then Postgres) and refused. While the
subscription is up (``live``), a cached row is trusted without asking Redis
(``Sessions.authenticate_early``): admission of a warm session is local.

The feed is only trusted while it provably hears everything:
- it is ``live`` only between a confirmed subscription and the first sign of
  trouble (an error, a missed ping); while it is not, every request asks Redis
  as before;
- on every (re)subscription the session cache is cleared before ``live`` is
  set, so nothing cached across a gap in the feed is trusted;
- a ping goes out when the channel has been quiet for ``PING_INTERVAL_S``; no
  answer within ``PING_TIMEOUT_S`` counts as a broken connection.

A revocation therefore reaches a process as fast as Redis delivers a message to
it (well under a millisecond on one host), where the per-request read found it
at the process's next request; a request already past admission is not
recalled, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as redis
from redis.asyncio.client import PubSub

from app.identity.account_cache import SessionAccountCache
from app.identity.revocation_list import REDIS_ERRORS, REVOCATIONS_CHANNEL

log = logging.getLogger(__name__)

PING_INTERVAL_S = 2.0
PING_TIMEOUT_S = 1.0
RECONNECT_DELAYS_S = (0.05, 0.2, 1.0, 2.0)


class RevocationFeed:
    """This process's subscription to revocations; drops revoked sessions from the cache."""

    def __init__(self, client: redis.Redis, cache: SessionAccountCache,
                 on_live: Callable[[bool], None] = lambda live: None) -> None:
        self.client = client
        self.cache = cache
        self.on_live = on_live
        self._live = False
        self.revocations_heard = 0
        self.subscriptions = 0
        self._task: asyncio.Task[None] | None = None
        self._pubsub: PubSub | None = None
        self._heard = asyncio.Event()

    @property
    def live(self) -> bool:
        return self._live

    @live.setter
    def live(self, live: bool) -> None:
        if live != self._live:
            self._live = live
            self.on_live(live)

    def start(self) -> None:
        assert self._task is None, "started twice"
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self.live = False
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def wait_live(self, subscriptions: int = 1) -> None:
        """Until the feed is live on its ``subscriptions``-th subscription or a later one."""
        while not (self.live and self.subscriptions >= subscriptions):
            self._heard.clear()
            await self._heard.wait()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except (*REDIS_ERRORS, FeedBroken) as error:
                delay_s = RECONNECT_DELAYS_S[min(failures, len(RECONNECT_DELAYS_S) - 1)]
                if failures == 0:
                    log.warning("revocation feed lost (%s); sessions are checked in Redis "
                                "until it is back", error)
                failures += 1
            else:
                delay_s, failures = RECONNECT_DELAYS_S[0], 0
            finally:
                self.live = False
                await self._close()
            await asyncio.sleep(delay_s)

    async def _listen(self) -> None:
        self._pubsub = pubsub = self.client.pubsub()
        await pubsub.subscribe(REVOCATIONS_CHANNEL)
        ping_sent = False
        while True:
            message = await pubsub.get_message(
                timeout=PING_TIMEOUT_S if ping_sent else PING_INTERVAL_S)
            if message is None:
                if ping_sent:
                    raise FeedBroken(f"no answer to a ping in {PING_TIMEOUT_S} s")
                await pubsub.ping()
                ping_sent = True
                continue
            ping_sent = False
            kind = message["type"]
            if kind == b"subscribe" or kind == "subscribe":
                # Whatever was revoked before now is in Postgres, which every row
                # loaded from here on reflects; rows loaded before may be stale.
                self.cache.clear()
                self.live = True
                self.subscriptions += 1
                self._heard.set()
            elif kind == b"message" or kind == "message":
                data = message["data"]
                jti = data.decode() if isinstance(data, bytes) else str(data)
                self.cache.drop(jti)
                self.revocations_heard += 1
                self._heard.set()

    async def _close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


class FeedBroken(Exception):
    """The subscription stopped answering."""
