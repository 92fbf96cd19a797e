"""Sessions, their accounts and the used nonces in Postgres: the truth about who may call.

Redis only mirrors revocations for speed; whenever Redis cannot answer, these
rows decide. Every query is scoped by the key that owns the row (a session's
jti with its account, an account's id, a wallet), so one caller never touches
another's sessions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.errors import AuthenticationFailed, PermissionDenied, ServiceUnavailable
from app.identity.authorization import Authorization
from app.storage import driver
from app.storage.tables import accounts, authorization_nonces, sessions

# Live (unexpired, unrevoked) sessions one account may hold. It bounds the work
# of revoking them all and the rows one signer can make us keep hot.
LIVE_SESSIONS_PER_ACCOUNT_MAX = 1000


@dataclass(frozen=True, slots=True)
class Account:
    """The account row as identity needs it."""

    id: int
    chain_id: int
    wallet: str
    smart_account: str
    status: str
    rate_limit_requests_per_min: int | None
    rate_limit_tokens_per_min: int | None


@dataclass(frozen=True, slots=True)
class SessionAccount:
    """A session row with its account: what authenticating one request needs."""

    jti: str
    wallet: str
    session_key: str
    chain_id: int
    expires_at_s: int
    revoked: bool
    account: Account


@dataclass(frozen=True, slots=True)
class RevokedSession:
    """A session just revoked, and when its token would have expired (for the Redis TTL)."""

    jti: str
    expires_at_s: int


def timestamp(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


# What the driver raises, under ``app.storage.driver``, when Postgres is down or restarting.
DRIVER_OUTAGES = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                  asyncpg.exceptions.OperatorInterventionError)


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Postgres being unreachable is an operating error (503), not our bug (500)."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError, OSError,
            TimeoutError, *DRIVER_OUTAGES):
        raise ServiceUnavailable("the database is unavailable; retry shortly",
                                 code="database_unavailable") from None


_ACCOUNT_COLUMNS = (
    accounts.c.id, accounts.c.chain_id, accounts.c.wallet, accounts.c.smart_account,
    accounts.c.status, accounts.c.rate_limit_requests_per_min,
    accounts.c.rate_limit_tokens_per_min,
)


# The session with its account, by jti ($1). Account columns keep their names.
LOAD_SESSION = f"""
SELECT session.jti, session.wallet AS session_wallet, session.session_key,
       session.chain_id AS session_chain_id, session.expires_at, session.revoked_at,
       {", ".join(f"account.{column.name}" for column in _ACCOUNT_COLUMNS)}
FROM {sessions.name} AS session
JOIN {accounts.name} AS account ON account.id = session.account_id
WHERE session.jti = $1
"""


def _account(mapping: Mapping[Any, Any]) -> Account:
    return Account(
        id=mapping["id"], chain_id=mapping["chain_id"], wallet=mapping["wallet"],
        smart_account=mapping["smart_account"], status=mapping["status"],
        rate_limit_requests_per_min=mapping["rate_limit_requests_per_min"],
        rate_limit_tokens_per_min=mapping["rate_limit_tokens_per_min"],
    )


class SessionStore:
    """Postgres reads and writes of the identity concern."""

    def __init__(self, engine: AsyncEngine, *,
                 live_sessions_max: int = LIVE_SESSIONS_PER_ACCOUNT_MAX) -> None:
        assert live_sessions_max > 0
        self.engine = engine
        self.live_sessions_max = live_sessions_max

    async def create(
        self, authorization: Authorization, *, jti: str, issued_at_s: int,
        credit_limit_micros: int, expires_at_s: int | None = None,
    ) -> Account:
        """Spend the nonce, upsert the account and open the session, in one transaction.

        ``expires_at_s`` is the signed ``expiresAt`` (the default), or earlier when the
        session key's policy ends first.

        The nonce goes first: its primary key makes a replay, even a concurrent
        one, wait for the first transaction and then find the nonce taken. Any
        refusal rolls everything back, the nonce included.
        """
        if expires_at_s is None:
            expires_at_s = authorization.expires_at_s
        assert expires_at_s <= authorization.expires_at_s, "never longer than signed"
        with database_errors():
            async with self.engine.begin() as connection:
                await self._spend_nonce(connection, authorization)
                account = await self._upsert_account(connection, authorization,
                                                     credit_limit_micros)
                if account.status != "active":
                    raise PermissionDenied("the account is suspended", code="account_suspended")
                await self._check_live_sessions(connection, account.id)
                await connection.execute(sessions.insert().values(
                    jti=jti, account_id=account.id, wallet=authorization.wallet,
                    session_key=authorization.session_key, chain_id=authorization.chain_id,
                    issued_at=timestamp(issued_at_s),
                    expires_at=timestamp(expires_at_s),
                ))
        return account

    async def _spend_nonce(self, connection: AsyncConnection,
                           authorization: Authorization) -> None:
        spent = await connection.execute(
            insert(authorization_nonces)
            .values(wallet=authorization.wallet, nonce=authorization.nonce)
            .on_conflict_do_nothing()
            .returning(authorization_nonces.c.nonce)
        )
        if spent.first() is None:
            raise AuthenticationFailed(
                "this nonce was already used by this wallet: sign a new authorization",
                param="nonce", code="nonce_reused",
            )

    async def _upsert_account(self, connection: AsyncConnection, authorization: Authorization,
                              credit_limit_micros: int) -> Account:
        # DO UPDATE (to itself) rather than DO NOTHING so RETURNING yields the
        # existing row, and its row lock serializes concurrent sessions of one account.
        values = insert(accounts).values(
            chain_id=authorization.chain_id, smart_account=authorization.smart_account,
            wallet=authorization.wallet, credit_limit_micros=credit_limit_micros,
        )
        statement = values.on_conflict_do_update(
            constraint="uq_accounts_chain_smart_account",
            set_={"wallet": accounts.c.wallet},
        ).returning(*_ACCOUNT_COLUMNS)
        row = (await connection.execute(statement)).one()
        return _account(row._mapping)

    async def _check_live_sessions(self, connection: AsyncConnection, account_id: int) -> None:
        live = await connection.scalar(
            sa.select(sa.func.count()).select_from(sessions).where(
                sessions.c.account_id == account_id,
                sessions.c.revoked_at.is_(None),
                sessions.c.expires_at > sa.func.now(),
            )
        )
        if (live or 0) >= self.live_sessions_max:
            raise PermissionDenied(
                f"the account has {self.live_sessions_max} live sessions, the most allowed:"
                " revoke some (DELETE /v1/authorize/sessions)", code="too_many_sessions",
            )

    async def load(self, jti: str) -> SessionAccount | None:
        """The session and its account, or None if no such session exists.

        On the request path (a cache miss, or the reload of an aging row), so one
        statement on the driver (``app.storage.driver``): one round trip.
        """
        with database_errors():
            rows = await driver.fetch(self.engine, LOAD_SESSION, jti)
        if not rows:
            return None
        mapping = rows[0]
        return SessionAccount(
            jti=mapping["jti"], wallet=mapping["session_wallet"],
            session_key=mapping["session_key"], chain_id=mapping["session_chain_id"],
            expires_at_s=int(mapping["expires_at"].timestamp()),
            revoked=mapping["revoked_at"] is not None, account=_account(mapping),
        )

    async def revoke_session(self, account_id: int, jti: str) -> list[RevokedSession] | None:
        """Revoke one session of this account; None if the account has no such session.

        Revoking an already revoked session is not an error: it answers the session.
        """
        owned = sa.and_(sessions.c.jti == jti, sessions.c.account_id == account_id)
        with database_errors():
            async with self.engine.begin() as connection:
                row = (await connection.execute(
                    sa.update(sessions).where(owned)
                    .values(revoked_at=sa.func.coalesce(sessions.c.revoked_at, sa.func.now()))
                    .returning(sessions.c.jti, sessions.c.expires_at)
                )).first()
        if row is None:
            return None
        return [RevokedSession(row.jti, int(row.expires_at.timestamp()))]

    async def revoke_account(self, account_id: int, leeway_s: int) -> list[RevokedSession]:
        """Revoke every session of the account whose token may still verify."""
        return await self._revoke_where(sessions.c.account_id == account_id, leeway_s)

    async def revoke_wallet(self, wallet: str, leeway_s: int) -> list[RevokedSession]:
        """Revoke every session any account opened with this wallet (operator action)."""
        return await self._revoke_where(sessions.c.wallet == wallet, leeway_s)

    async def _revoke_where(self, owner: sa.ColumnElement[bool],
                            leeway_s: int) -> list[RevokedSession]:
        # A token verifies up to leeway after exp, so those sessions are revoked too.
        still_verifiable = sessions.c.expires_at > sa.func.now() - timedelta(seconds=leeway_s)
        with database_errors():
            async with self.engine.begin() as connection:
                rows = (await connection.execute(
                    sa.update(sessions)
                    .where(owner, sessions.c.revoked_at.is_(None), still_verifiable)
                    .values(revoked_at=sa.func.now())
                    .returning(sessions.c.jti, sessions.c.expires_at)
                )).all()
        return [RevokedSession(row.jti, int(row.expires_at.timestamp())) for row in rows]

    async def wallet_has_live_session(self, wallet: str) -> bool:
        query = sa.select(sa.exists().where(
            sessions.c.wallet == wallet,
            sessions.c.revoked_at.is_(None),
            sessions.c.expires_at > sa.func.now(),
        ))
        with database_errors():
            async with self.engine.connect() as connection:
                return bool(await connection.scalar(query))
