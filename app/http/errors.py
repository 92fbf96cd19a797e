"""The one place where errors become HTTP responses in the OpenAI shape."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from app.errors import ApiError, InternalError, InvalidRequest, NotFound, RequestTooLarge
from app.http.request_context import assign_request_id

log = logging.getLogger(__name__)


def error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def from_http_exception(exception: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (unknown route, wrong method, body too large) in our shape."""
    status = exception.status
    if status == 413:
        return RequestTooLarge(
            "the request body is larger than the limit", code="request_too_large"
        )
    if status == 404:
        return NotFound("unknown URL; see the API reference", code="unknown_url")
    if status == 405:
        error: ApiError = InvalidRequest("method not allowed here", code="method_not_allowed")
        error.status = 405
        error.headers = {"Allow": exception.headers.get("Allow", "")}
        return error
    if 400 <= status < 500:
        error = InvalidRequest(exception.reason or "bad request", code="bad_request")
        error.status = status
        return error
    return InternalError("internal error")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as an OpenAI error; never a stack trace.

    The outermost middleware, so it also gives every request its id first (a
    middleware of its own would add a frame to every resumption of every call).
    """
    assign_request_id(request)
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error)
    except web.HTTPException as exception:
        if exception.status < 400:
            raise
        return error_response(from_http_exception(exception))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(InternalError("internal error; the request id identifies it"))
