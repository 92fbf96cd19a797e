"""The ceiling for a Python proxy: aiohttp in, aiohttp out, nothing in between.

It reads the body, POSTs it to the upstream as it is and relays the answer as it
is: a JSON body as bytes, a stream by writing each piece as soon as it arrives.
No parsing, no validation, no accounting, so whatever Tollgate costs on top of
this is the price of what Tollgate does (or of how it does it).

    python -m bench.bare_proxy --port 0 --upstream http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Callable

import aiohttp
import uvloop
from aiohttp import web

# One pool as big as the highest benchmark concurrency needs, and then some,
# so the bare proxy never queues for a connection.
POOL_CONNECTIONS_MAX = 1024
UPSTREAM_URL = web.AppKey("upstream_url", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
# Hop-by-hop and framing headers are the server's business, not the upstream's.
_SKIPPED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(
        request.app[UPSTREAM_URL], data=body, headers={"Content-Type": "application/json"}
    ) as upstream:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _SKIPPED_HEADERS}
        if upstream.content_type != "text/event-stream":
            return web.Response(body=await upstream.read(), status=upstream.status,
                                headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        # iter_any hands over whatever arrived, at once: one write per upstream read.
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
        return response


def _session_context(upstream: str) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=POOL_CONNECTIONS_MAX, limit_per_host=0)
        # Bytes are relayed untouched, so no decompression and no cookies.
        session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
        )
        app[SESSION] = session
        app[UPSTREAM_URL] = upstream.rstrip("/") + "/chat/completions"
        yield
        await session.close()

    return context


def create_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.cleanup_ctx.append(_session_context(upstream))
    app.router.add_post("/v1/chat/completions", _chat)
    return app


async def _serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(create_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    bound_port = runner.addresses[0][1]
    print(f"bare proxy listening on http://{host}:{bound_port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.bare_proxy", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="base URL ending in /v1")
    args = parser.parse_args()
    uvloop.run(_serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
