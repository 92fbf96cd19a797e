"""The per-IP request limit of the endpoints a client calls before it has an account.

They are matched by method and path, whether or not a route matched: aiohttp
runs middlewares for unmatched requests too, so the limit holds even while a
route is missing. The method matters because one path serves both sides:
``DELETE /v1/authorize`` (sign out) is authenticated and is not limited per IP.
HEAD counts as the GET it mirrors.

The client is ``request.remote``, the peer of the TCP connection. Behind a
reverse proxy that is the proxy itself, and all clients would share one bucket:
the operator must make aiohttp see the real client (for example by terminating
at a proxy that speaks the PROXY protocol, or by adding a forwarded-header
middleware that trusts only that proxy). ``X-Forwarded-For`` is never read here,
because any client can send it.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from app.limits.bucket_keys import ip_request_key
from app.limits.headers import publish_headers
from app.limits.limiter import Limit, Limiter
from app.limits.token_buckets import Bucket

IP_REQUESTS_LABEL = "ip_requests"
# The one list of endpoints limited per IP: those that work without a session.
UNAUTHENTICATED_ENDPOINTS = frozenset(
    {
        ("POST", "/v1/authorize"),
        ("GET", "/v1/authorize/check"),
        ("GET", "/v1/authorize/schema"),
    }
)


def is_unauthenticated(method: str, path: str) -> bool:
    method = "GET" if method == "HEAD" else method
    return (method, path) in UNAUTHENTICATED_ENDPOINTS


def ip_limit_middleware(limiter: Limiter, *, requests_per_min: int) -> Middleware:
    """A middleware that debits one request from the caller's IP bucket on those paths."""

    @web.middleware
    async def ip_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_unauthenticated(request.method, request.path):
            return await handler(request)
        limit = Limit(
            IP_REQUESTS_LABEL,
            "requests per minute from this IP address",
            Bucket(ip_request_key(request.remote), requests_per_min, 1),
        )
        admission = await limiter.acquire(limit)
        if admission is not None:
            publish_headers(request, admission.headers)
        return await handler(request)

    return ip_limit
