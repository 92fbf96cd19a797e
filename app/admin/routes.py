"""The admin endpoints (listed in ``app.admin``). Every handler checks the operator's
token first; lists follow Stripe's conventions (``{object: "list", data, has_more}``,
newest first, cursor ``starting_after``, bounded ``limit``)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from app.admin import accounts
from app.admin.auth import require_admin
from app.admin.reconciliation import RECONCILIATION
from app.errors import InvalidRequest, NotFound, RequestTooLarge
from app.http.keys import DATABASE
from app.identity.session_store import database_errors
from app.identity.sessions import SESSIONS
from app.identity.tokens import account_reference
from app.reconcile.render import as_csv, as_json

log = logging.getLogger(__name__)

LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100
# Payments and settlements shown with one account.
RECENT_MONEY_MAX = 20
PATCH_BODY_BYTES_MAX = 4096
UPDATABLE_FIELDS = frozenset({"credit_limit_micros"})
BLOCK_DIGITS_MAX = 15


async def list_accounts(request: web.Request) -> web.Response:
    require_admin(request)
    limit = _limit(request.query)
    starting_after = None
    if "starting_after" in request.query:
        starting_after = accounts.parse_account_reference(request.query["starting_after"])
        if starting_after is None:
            raise InvalidRequest("starting_after must be an account id (acct_...)",
                                 param="starting_after", code="invalid_value")
    with database_errors():
        rows, has_more = await accounts.account_page(request.app[DATABASE], limit=limit,
                                                     starting_after=starting_after)
    return web.json_response({"object": "list", "url": "/v1/admin/accounts",
                              "data": [accounts.account_object(row) for row in rows],
                              "has_more": has_more})


async def get_account(request: web.Request) -> web.Response:
    require_admin(request)
    account_id = _account_id(request)
    engine = request.app[DATABASE]
    with database_errors():
        row = await accounts.find_account(engine, account_id)
        if row is None:
            raise _no_such_account()
        recent = await accounts.recent_money(engine, account_id, limit=RECENT_MONEY_MAX)
    payments, more_payments = recent["payments"]
    settlements, more_settlements = recent["settlements"]
    return web.json_response({
        **accounts.account_object(row),
        "payments": {"object": "list", "has_more": more_payments,
                     "data": [accounts.payment_object(p) for p in payments]},
        "settlements": {"object": "list", "has_more": more_settlements,
                        "data": [accounts.settlement_object(s) for s in settlements]},
    })


async def update_account(request: web.Request) -> web.Response:
    require_admin(request)
    account_id = _account_id(request)
    credit_limit_micros = _credit_limit(await _json_object(request))
    with database_errors():
        updated = await accounts.set_credit_limit(request.app[DATABASE], account_id,
                                                  credit_limit_micros)
    if updated is None:
        raise _no_such_account()
    row, previous = updated
    log.warning("credit limit of %s set to %d micro-USD by the operator (was %d)",
                account_reference(account_id), credit_limit_micros, previous)
    return web.json_response(accounts.account_object(row))


async def revoke_sessions(request: web.Request) -> web.Response:
    require_admin(request)
    account_id = _account_id(request)
    with database_errors():
        if await accounts.find_account(request.app[DATABASE], account_id) is None:
            raise _no_such_account()
    sessions = request.app[SESSIONS]
    revoked = await sessions.store.revoke_account(account_id, sessions.codec.leeway_s)
    # Postgres now refuses them; Redis makes every process refuse them on the next request.
    await sessions.revocations.publish(revoked)
    log.warning("%d session(s) of %s revoked by the operator", len(revoked),
                account_reference(account_id))
    return web.json_response({"object": "session.revocation",
                              "account": account_reference(account_id),
                              "revoked": [session.jti for session in revoked]})


async def reconciliation(request: web.Request) -> web.Response:
    require_admin(request)
    query = request.query
    output = query.get("format", "json")
    if output not in ("json", "csv"):
        raise InvalidRequest("format must be json or csv", param="format",
                             code="invalid_value")
    report = await request.app[RECONCILIATION].report(
        request.app, from_block=_block(query, "from_block"), to_block=_block(query, "to_block"))
    if output == "csv":
        return web.Response(
            text=as_csv(report), content_type="text/csv", charset="utf-8",
            headers={"Content-Disposition": 'attachment; filename="reconciliation.csv"'})
    return web.json_response(as_json(report))


def _no_such_account() -> NotFound:
    return NotFound("no such account", param="id", code="account_not_found")


def _account_id(request: web.Request) -> int:
    account_id = accounts.parse_account_reference(request.match_info["account_id"])
    if account_id is None:
        # A malformed id names no account: the same answer as an unknown one.
        raise _no_such_account()
    return account_id


def _limit(query: MultiMapping[str]) -> int:
    raw = query.get("limit")
    if raw is None:
        return LIST_LIMIT_DEFAULT
    if not raw.isdigit() or not 1 <= int(raw) <= LIST_LIMIT_MAX:
        raise InvalidRequest(f"limit must be an integer in 1..{LIST_LIMIT_MAX}", param="limit",
                             code="invalid_value")
    return int(raw)


def _block(query: MultiMapping[str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > BLOCK_DIGITS_MAX:
        raise InvalidRequest(f"{name} must be a block number", param=name,
                             code="invalid_value")
    return int(raw)


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, refused past ``PATCH_BODY_BYTES_MAX`` bytes."""
    if request.content_length is not None and request.content_length > PATCH_BODY_BYTES_MAX:
        raise RequestTooLarge(f"the body is larger than {PATCH_BODY_BYTES_MAX} bytes")
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > PATCH_BODY_BYTES_MAX:
            raise RequestTooLarge(f"the body is larger than {PATCH_BODY_BYTES_MAX} bytes")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(f"the body is not valid JSON ({error.msg})",
                             code="invalid_json") from None
    if not isinstance(document, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_json")
    return document


def _credit_limit(document: dict[str, Any]) -> int:
    unknown = sorted(set(document) - UPDATABLE_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown parameter {unknown[0]}; only credit_limit_micros can"
                             " be updated", param=unknown[0], code="unknown_parameter")
    if "credit_limit_micros" not in document:
        raise InvalidRequest("credit_limit_micros is required", param="credit_limit_micros",
                             code="missing_parameter")
    value = document["credit_limit_micros"]
    # bool is an int in Python; JSON true is not a credit limit.
    if (not isinstance(value, int) or isinstance(value, bool)
            or not 0 <= value <= accounts.CREDIT_LIMIT_MICROS_MAX):
        raise InvalidRequest(
            "credit_limit_micros must be an integer number of micro-USD in"
            f" 0..{accounts.CREDIT_LIMIT_MICROS_MAX}",
            param="credit_limit_micros", code="invalid_value")
    return value
