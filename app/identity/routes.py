"""The identity endpoints.

    POST   /v1/authorize                      wallet-signed Authorization -> 201 session token
    GET    /v1/authorize/schema               the EIP-712 schema, domains and limits
    GET    /v1/authorize/check?wallet=0x..    does the wallet have a live session
    DELETE /v1/authorize                      revoke the presented session
    DELETE /v1/authorize/sessions             revoke every session of the caller's account
    DELETE /v1/authorize/sessions/{id}        revoke one session of the caller's account
    POST   /admin/wallets/{wallet}/revoke     operator: revoke every session of a wallet
"""

from __future__ import annotations

import orjson
from aiohttp import web

from app.admin.auth import require_admin
from app.errors import InvalidRequest, NotFound, RequestTooLarge
from app.http.keys import SETTINGS
from app.identity.addresses import parse_address
from app.identity.authenticate import authenticate
from app.identity.authorization import BODY_BYTES_MAX, parse_authorization, schema_document
from app.identity.sessions import SESSIONS
from app.identity.signature import SIGNATURE_HEADER, signature_from_header
from app.identity.tokens import JTI_PATTERN

REVOCATION = "session.revocation"


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/authorize", authorize)
    app.router.add_delete("/v1/authorize", revoke_presented)
    app.router.add_get("/v1/authorize/schema", schema)
    app.router.add_get("/v1/authorize/check", check)
    app.router.add_delete("/v1/authorize/sessions", revoke_all)
    app.router.add_delete("/v1/authorize/sessions/{session_id}", revoke_one)
    app.router.add_post("/admin/wallets/{wallet}/revoke", admin_revoke_wallet)


async def authorize(request: web.Request) -> web.Response:
    body = _json(await _read_bounded(request, BODY_BYTES_MAX))
    authorization = parse_authorization(body)
    signature = signature_from_header(request.headers.getall(SIGNATURE_HEADER, []))
    issued = await request.app[SESSIONS].authorize(authorization, signature)
    # A token is a credential: no cache may keep it (RFC 6749 section 5.1).
    return web.json_response(issued.body(), status=201,
                             headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def schema(request: web.Request) -> web.Response:
    return web.json_response(schema_document(request.app[SETTINGS]))


async def check(request: web.Request) -> web.Response:
    """Unauthenticated on purpose: it says whether a session exists, nothing more."""
    values = request.query.getall("wallet", [])
    if len(values) != 1:
        raise InvalidRequest("give exactly one wallet query parameter", param="wallet",
                             code="missing_parameter" if not values else "invalid_parameter")
    wallet = parse_address(values[0], "wallet")
    live = await request.app[SESSIONS].has_live_session(wallet)
    return web.json_response({"object": "wallet.session_status", "wallet": wallet,
                              "has_live_session": live})


async def revoke_presented(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    revoked = await request.app[SESSIONS].revoke_session(principal, principal.session_jti)
    assert revoked is not None, "an authenticated session exists"
    return _revocation(revoked)


async def revoke_all(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    return _revocation(await request.app[SESSIONS].revoke_account(principal))


async def revoke_one(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    session_id = request.match_info["session_id"]
    revoked = None
    if JTI_PATTERN.fullmatch(session_id):
        revoked = await request.app[SESSIONS].revoke_session(principal, session_id)
    if revoked is None:
        # Another account's session is "not found" too: its existence is not ours to tell.
        raise NotFound("no such session on this account", param="session_id",
                       code="session_not_found")
    return _revocation(revoked)


async def admin_revoke_wallet(request: web.Request) -> web.Response:
    require_admin(request)
    wallet = parse_address(request.match_info["wallet"], "wallet")
    revoked = await request.app[SESSIONS].revoke_wallet(wallet)
    return _revocation(revoked, wallet=wallet)


def _revocation(jtis: list[str], **extra: str) -> web.Response:
    return web.json_response({"object": REVOCATION, **extra, "revoked": jtis})


async def _read_bounded(request: web.Request, bytes_max: int) -> bytes:
    """The body, refused as soon as it is longer than ``bytes_max`` (not after reading it all)."""
    if request.content_length is not None and request.content_length > bytes_max:
        raise RequestTooLarge(f"the body is larger than {bytes_max} bytes")
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > bytes_max:
            raise RequestTooLarge(f"the body is larger than {bytes_max} bytes")
    return bytes(body)


def _json(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(
            f"the body is not valid JSON ({error.msg} at position {error.pos})",
            code="invalid_json",
        ) from None
