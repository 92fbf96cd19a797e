"""For the account holder: GET /v1/account and GET /v1/usage.

Every query is scoped by the authenticated principal's account id, so one
account can never read another's rows. Lists follow Stripe's conventions:
``{object: "list", data, has_more}``, newest first, cursor ``starting_after``
(a record id), bounded ``limit``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web
from sqlalchemy import func, select

from app.errors import InvalidRequest, NotFound
from app.http.keys import DATABASE, SETTINGS
from app.identity.authenticate import authenticate
from app.ledger.balance import AccountBalance
from app.ledger.leases import LEASE_ID_PREFIX
from app.ledger.money import COST_UNIT
from app.storage.tables import accounts, holds, usage_records

LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100
RECORD_ID_PREFIX = "ur_"


async def get_account(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    settings = request.app[SETTINGS]
    u = usage_records.c
    totals = (
        select(
            func.count(u.id).label("requests"),
            func.coalesce(func.sum(u.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(u.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(u.base_cost_micros), 0).label("base_cost"),
            func.coalesce(func.sum(u.commission_micros), 0).label("commission"),
            func.coalesce(func.sum(u.total_micros), 0).label("total_cost"),
        )
        .where(u.account_id == principal.account_id)
    )
    leased = (
        select(func.coalesce(func.sum(holds.c.amount_micros), 0))
        .where(holds.c.account_id == principal.account_id)
        .where(holds.c.request_id.startswith(LEASE_ID_PREFIX, autoescape=True))
    )
    async with request.app[DATABASE].connect() as connection:
        account = (await connection.execute(
            select(accounts).where(accounts.c.id == principal.account_id)
        )).mappings().first()
        sums = (await connection.execute(totals)).mappings().one()
        leased_micros = int((await connection.execute(leased)).scalar_one())
    if account is None:
        raise NotFound("account not found", code="account_not_found")
    balance = AccountBalance(
        usage_micros=account["usage_micros"],
        paid_micros=account["paid_micros"],
        held_micros=account["held_micros"],
        credit_limit_micros=account["credit_limit_micros"],
        settlement_failed=account["settlement_failed_at"] is not None,
    )
    return web.json_response({
        "object": "account",
        "id": f"acct_{account['id']}",
        "wallet": account["wallet"],
        "smart_account": account["smart_account"],
        "chain_id": account["chain_id"],
        "status": account["status"],
        "cost_unit": COST_UNIT,
        # The balance rule (app.ledger.balance): a request is served while its maximum
        # cost fits in "available" = credit_limit - balance - open_holds.
        "usage": balance.usage_micros,
        "payments": balance.paid_micros,
        "balance": balance.balance_micros,
        "open_holds": balance.held_micros,
        # Of the open holds, credit Tollgate reserved for this account's next calls
        # (credit leases, app.ledger.leases): returned within seconds when unused.
        "leased": leased_micros,
        "credit_limit": balance.effective_credit_limit_micros,
        "available": balance.available_micros,
        "settlement_failed": balance.settlement_failed,
        "totals": {key: int(value) for key, value in sums.items()},
        "limits": {
            "requests_per_min": account["rate_limit_requests_per_min"]
            or settings.rate_limit_requests_per_min,
            "tokens_per_min": account["rate_limit_tokens_per_min"]
            or settings.rate_limit_tokens_per_min,
        },
        "created": int(account["created_at"].timestamp()),
    })


async def list_usage(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    query = request.query
    limit = _int_param(query, "limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX)
    u = usage_records.c
    statement = select(usage_records).where(u.account_id == principal.account_id)
    if "starting_after" in query:
        statement = statement.where(u.id < _record_id(query["starting_after"]))
    if "model" in query:
        statement = statement.where(u.public_model == query["model"][:256])
    if "created_gte" in query:
        statement = statement.where(u.created_at >= _time_param(query, "created_gte"))
    if "created_lt" in query:
        statement = statement.where(u.created_at < _time_param(query, "created_lt"))
    statement = statement.order_by(u.id.desc()).limit(limit + 1)
    async with request.app[DATABASE].connect() as connection:
        rows = (await connection.execute(statement)).mappings().all()
    return web.json_response({
        "object": "list",
        "data": [usage_record_object(row) for row in rows[:limit]],
        "has_more": len(rows) > limit,
    })


def usage_record_object(row: Any) -> dict[str, Any]:
    return {
        "id": f"{RECORD_ID_PREFIX}{row['id']}",
        "object": "usage.record",
        "request_id": row["request_id"],
        "created": int(row["created_at"].timestamp()),
        "model": row["public_model"],
        "provider": row["provider"],
        "upstream_model": row["upstream_model"],
        "status": row["status"],
        "streamed": row["streamed"],
        "usage": {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "cached_tokens": row["cached_tokens"],
            "reasoning_tokens": row["reasoning_tokens"],
            "source": row["usage_source"],
        },
        "cost_unit": COST_UNIT,
        "base_cost": row["base_cost_micros"],
        "commission": row["commission_micros"],
        "commission_rate_bps": row["commission_rate_bps"],
        "total_cost": row["total_micros"],
        "latency_ms": row["latency_ms"],
        "time_to_first_chunk_ms": row["time_to_first_chunk_ms"],
    }


def _int_param(query: Any, name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer in {low}..{high}", param=name,
                             code="invalid_value")
    return int(raw)


def _record_id(raw: str) -> int:
    digits = raw.removeprefix(RECORD_ID_PREFIX)
    if not raw.startswith(RECORD_ID_PREFIX) or not digits.isdigit() or len(digits) > 18:
        raise InvalidRequest("starting_after must be a usage record id (ur_...)",
                             param="starting_after", code="invalid_value")
    return int(digits)


def _time_param(query: Any, name: str) -> dt.datetime:
    raw = query[name]
    if not raw.isdigit() or len(raw) > 12:
        raise InvalidRequest(f"{name} must be a unix timestamp in seconds", param=name,
                             code="invalid_value")
    return dt.datetime.fromtimestamp(int(raw), tz=dt.UTC)
