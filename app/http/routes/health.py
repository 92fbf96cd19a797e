"""Liveness and readiness.

Live: the process answers. Ready: Postgres and Redis answer within a second,
so a load balancer stops sending traffic to an instance that cannot bill.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from sqlalchemy import text

from app.http.keys import DATABASE, REDIS

READY_CHECK_TIMEOUT_S = 1.0


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    checks = {
        "postgres": await _check(_postgres(request)),
        "redis": await _check(_redis(request)),
    }
    healthy = all(state == "ok" for state in checks.values())
    return web.json_response(
        {"status": "ok" if healthy else "unavailable", "checks": checks},
        status=200 if healthy else 503,
    )


async def _postgres(request: web.Request) -> None:
    async with request.app[DATABASE].connect() as connection:
        await connection.execute(text("SELECT 1"))


async def _redis(request: web.Request) -> None:
    await request.app[REDIS].ping()  # type: ignore[misc]  # redis-py 7 types ping as sync|async


async def _check(probe: object) -> str:
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
            await probe  # type: ignore[misc]
    except TimeoutError:
        return "timeout"
    except Exception as error:  # a dependency being down is an expected operating error
        return f"error: {type(error).__name__}"
    return "ok"
