"""Revoked session ids in Redis: the fast path every authenticated request reads.

One key per revoked session, ``tg:session:{<jti>}:revoked``, holding the unix
second of revocation and expiring when the token could no longer verify anyway
(its ``exp`` plus the leeway). The hash tag is the jti, so keys spread over a
Redis Cluster's slots and the per-request read is a single-key GET. Postgres
holds the same fact (``sessions.revoked_at``) and is written first; when Redis
cannot answer, the caller asks Postgres.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from app.identity.session_store import RevokedSession
from app.storage.redis_batch import RedisBatcher

log = logging.getLogger(__name__)

REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
# Revoking many sessions sends SETs in pipelines of this many.
PIPELINE_COMMANDS_MAX = 500
# A Redis outage is logged at most this often, not once per request.
OUTAGE_LOG_INTERVAL_S = 10.0


# Every revoked jti is published here too (app.identity.revocation_feed).
REVOCATIONS_CHANNEL = b"tg:revocations"


def revoked_key(jti: str) -> str:
    return f"tg:session:{{{jti}}}:revoked"


class RevocationList:
    """Reads and writes the revoked-session keys; never caches an answer."""

    def __init__(self, client: redis.Redis, *, leeway_s: int,
                 batcher: RedisBatcher | None = None) -> None:
        self.client = client
        # Reads of concurrent requests share round trips (app.storage.redis_batch).
        self.batcher = batcher or RedisBatcher(client)
        assert self.batcher.client is client, "the batcher sends on this client"
        self.leeway_s = leeway_s
        self._outage_logged_s = -OUTAGE_LOG_INTERVAL_S

    async def is_revoked(self, jti: str) -> bool | None:
        """True or False from Redis; None when Redis could not answer (ask Postgres)."""
        return await self.answer(self.ask(jti))

    def ask(self, jti: str) -> asyncio.Future[Any]:
        """Send the check now; ``answer`` reads it. An answer nobody reads is dropped."""
        reply = self.batcher.submit("GET", revoked_key(jti))
        reply.add_done_callback(_read_quietly)
        return reply

    async def answer(self, reply: asyncio.Future[Any]) -> bool | None:
        """What ``is_revoked`` returns, for a check sent by ``ask``."""
        try:
            value = await reply
        except REDIS_ERRORS as error:
            self._log_outage(error)
            return None
        return value is not None

    async def publish(self, revoked: Sequence[RevokedSession]) -> bool:
        """Tell every instance at once; False if Redis failed (Postgres already knows).

        Until the keys are written, instances learn of the revocation when their
        cached session row expires (``account_cache.CACHE_TTL_S``).
        """
        now_s = int(time.time())
        try:
            for start in range(0, len(revoked), PIPELINE_COMMANDS_MAX):
                async with self.client.pipeline(transaction=False) as pipeline:
                    for session in revoked[start:start + PIPELINE_COMMANDS_MAX]:
                        ttl_s = max(1, session.expires_at_s + self.leeway_s - now_s)
                        pipeline.set(revoked_key(session.jti), now_s, ex=ttl_s)
                        # After the key: a process that hears it and reads at once
                        # finds the key (app.identity.revocation_feed).
                        pipeline.publish(REVOCATIONS_CHANNEL, session.jti)
                    await pipeline.execute()
        except REDIS_ERRORS as error:
            log.error("revocation of %d session(s) not published to Redis (%s); instances"
                      " see it within the session cache lifetime", len(revoked), error)
            return False
        return True

    def _log_outage(self, error: BaseException) -> None:
        now_s = time.monotonic()
        if now_s - self._outage_logged_s >= OUTAGE_LOG_INTERVAL_S:
            self._outage_logged_s = now_s
            log.warning("Redis unavailable for revocation checks (%s); reading Postgres", error)


def _read_quietly(reply: asyncio.Future[Any]) -> None:
    # A request that failed before awaiting its check must not leave an error unread.
    if not reply.cancelled():
        reply.exception()
