"""The voucher endpoints.

    POST /v1/vouchers          the session's key posts a signed DebitVoucher -> 200 the stored one
    GET  /v1/vouchers/schema   the EIP-712 typed data a session key signs, and the limits

Only sessions on Tollgate's chain whose smart account is a deployed contract can give
vouchers: the settlement contract collects from nothing else. Every refusal is an
``ApiError`` (OpenAI error shape); a chain that cannot be asked is a 503.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from app.chain.errors import ChainError
from app.errors import InvalidRequest, RequestTooLarge, ServiceUnavailable
from app.http.keys import CHAIN
from app.identity.authenticate import authenticate
from app.settlement.vouchers import (
    BODY_BYTES_MAX,
    VoucherStore,
    check_signer,
    parse_voucher,
    schema_document,
)

VOUCHERS = web.AppKey("vouchers", VoucherStore)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/vouchers", post_voucher)
    app.router.add_get("/v1/vouchers/schema", voucher_schema)


async def voucher_schema(request: web.Request) -> web.Response:
    return web.json_response(schema_document(request.app[VOUCHERS].domain))


async def post_voucher(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    store = request.app[VOUCHERS]
    domain = store.domain
    voucher = parse_voucher(_json(await _read_bounded(request)), int(time.time()))
    if principal.chain_id != domain.chain_id:
        raise InvalidRequest(
            f"vouchers are collected on chain {domain.chain_id}; this session is on chain"
            f" {principal.chain_id}", code="wrong_chain")
    # Checked before any chain call: a bad signature costs us nothing but a recovery.
    check_signer(domain, voucher, account=principal.smart_account,
                 session_key=principal.session_key)
    try:
        deployed = bool(await request.app[CHAIN].code_at(principal.smart_account))
    except ChainError as error:
        raise ServiceUnavailable(f"the chain cannot be asked now ({type(error).__name__})",
                                 code="chain_unavailable") from None
    if not deployed:
        raise InvalidRequest(
            "this session's account is not a deployed smart account: only a smart account's"
            " session key can authorize collections (pay with x402 instead)",
            code="smart_account_required")
    stored = await store.save(principal.account_id, principal.session_key, voucher)
    return web.json_response(stored.body(domain))


async def _read_bounded(request: web.Request) -> bytes:
    """The body, refused as soon as it is longer than the bound (not after reading it all)."""
    if request.content_length is not None and request.content_length > BODY_BYTES_MAX:
        raise RequestTooLarge(f"the body is larger than {BODY_BYTES_MAX} bytes")
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > BODY_BYTES_MAX:
            raise RequestTooLarge(f"the body is larger than {BODY_BYTES_MAX} bytes")
    return bytes(body)


def _json(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(
            f"the body is not valid JSON ({error.msg} at position {error.pos})",
            code="invalid_json",
        ) from None
