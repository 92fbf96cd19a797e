"""Who is calling: the authenticated account behind a request."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Principal:
    """An account authenticated by a live session token.

    ``account_id`` is the only key any handler may use to read or spend: one
    account never sees another's rows because every query is scoped by it.
    """

    account_id: int
    chain_id: int
    wallet: str
    smart_account: str
    session_jti: str
    session_key: str
    # Per-account rate limit overrides (None: the global default).
    rate_limit_requests_per_min: int | None = None
    rate_limit_tokens_per_min: int | None = None


PRINCIPAL = web.RequestKey("principal", Principal)
