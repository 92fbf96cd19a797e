"""The Postgres side of sessions, and the short-lived row cache in front of it."""

from __future__ import annotations

import secrets
import time

import pytest

from app.errors import PermissionDenied
from app.http.keys import DATABASE
from app.identity.account_cache import SessionAccountCache
from app.identity.authorization import Authorization
from app.identity.session_store import Account, SessionAccount, SessionStore
from tests.conftest import RunningTollgate
from tests.identity.wallets import new_wallet


def authorization(wallet: str) -> Authorization:
    now_s = int(time.time())
    return Authorization(wallet=wallet, smart_account=wallet, session_key=wallet,
                         chain_id=31337, nonce=secrets.token_hex(8), issued_at_s=now_s,
                         expires_at_s=now_s + 600)


async def test_live_sessions_per_account_are_bounded(tollgate: RunningTollgate) -> None:
    store = SessionStore(tollgate.app[DATABASE], live_sessions_max=2)
    wallet = new_wallet().address.lower()

    async def open_session() -> str:
        jti = secrets.token_hex(16)
        await store.create(authorization(wallet), jti=jti, issued_at_s=int(time.time()),
                           credit_limit_micros=1)
        return jti

    first = await open_session()
    await open_session()
    with pytest.raises(PermissionDenied) as refused:
        await open_session()
    assert refused.value.code == "too_many_sessions"
    # Revoked sessions do not count.
    row = await store.load(first)
    assert row is not None
    await store.revoke_session(row.account.id, first)
    await open_session()


def _row(jti: str) -> SessionAccount:
    account = Account(id=1, chain_id=1, wallet="0x" + "1" * 40, smart_account="0x" + "1" * 40,
                      status="active", rate_limit_requests_per_min=None,
                      rate_limit_tokens_per_min=None)
    return SessionAccount(jti=jti, wallet=account.wallet, session_key=account.wallet,
                          chain_id=1, expires_at_s=0, revoked=False, account=account)


def test_cache_forgets_after_its_ttl_and_bounds_its_size() -> None:
    now = [100.0]
    cache = SessionAccountCache(ttl_s=2.0, entries_max=2, clock=lambda: now[0])
    cache.put(_row("a"), cache.generation)
    now[0] += 2.0
    assert cache.get("a") is not None
    now[0] += 0.01
    assert cache.get("a") is None, "older than 2 s: read again"
    cache.put(_row("a"), cache.generation)
    cache.put(_row("b"), cache.generation)
    cache.put(_row("c"), cache.generation)
    assert len(cache) == 2 and cache.get("a") is None, "the oldest entry went first"


def test_cache_asks_for_a_reload_once_a_row_is_over_its_refresh_age() -> None:
    now = [100.0]
    cache = SessionAccountCache(ttl_s=2.0, refresh_after_s=1.0, clock=lambda: now[0])
    cache.put(_row("a"), cache.generation)
    assert cache.lookup("a").refresh is False
    now[0] += 1.5
    aging = cache.lookup("a")
    assert aging.row is not None and aging.refresh is True
    cache.put(_row("a"), cache.generation)
    assert cache.lookup("a").refresh is False, "a reload makes the row young again"
    cache.drop("a")
    assert cache.lookup("a").row is None
