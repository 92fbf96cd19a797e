"""The schema as SQLAlchemy Core tables: the single source alembic migrates from.

Money columns are BIGINT micro-USD (``*_micros``; 1 micro-USD = 1 USDC base unit),
see ``app.ledger.money``. Addresses are stored lowercase ``0x`` hex. Rows that record
money (usage) are appended, never edited: a mistake is corrected by a new row.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    func,
)

# Constraint names are deterministic so migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

ADDRESS = String(42)

accounts = Table(
    "accounts",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    # The payer: a smart account (or an EOA paying for itself) on one chain.
    Column("chain_id", BigInteger, nullable=False),
    Column("smart_account", ADDRESS, nullable=False),
    # The wallet that first proved control of the account.
    Column("wallet", ADDRESS, nullable=False),
    Column("status", String(16), nullable=False, server_default="active"),
    # Recorded usage not yet covered by payments; kept in step with usage_records.
    Column("debt_micros", BigInteger, nullable=False, server_default="0"),
    Column("credit_limit_micros", BigInteger, nullable=False),
    # Per-account rate limit overrides; NULL means the global default.
    Column("rate_limit_requests_per_min", Integer, nullable=True),
    Column("rate_limit_tokens_per_min", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("chain_id", "smart_account", name="uq_accounts_chain_smart_account"),
    CheckConstraint("status IN ('active', 'suspended')", name="status"),
    CheckConstraint("credit_limit_micros >= 0", name="credit_limit_non_negative"),
)

# Every Authorization nonce ever accepted, so a signed message works once.
authorization_nonces = Table(
    "authorization_nonces",
    metadata,
    Column("wallet", ADDRESS, primary_key=True),
    Column("nonce", String(80), primary_key=True),
    Column("used_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

sessions = Table(
    "sessions",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("account_id", BigInteger, ForeignKey("accounts.id"), nullable=False),
    Column("wallet", ADDRESS, nullable=False),
    Column("session_key", ADDRESS, nullable=False),
    Column("chain_id", BigInteger, nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Index("ix_sessions_account_live", "account_id", "expires_at"),
    Index("ix_sessions_wallet", "wallet"),
)

usage_records = Table(
    "usage_records",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    # Our request id: the idempotency key, so a record is written at most once.
    Column("request_id", String(64), nullable=False, unique=True),
    Column("account_id", BigInteger, ForeignKey("accounts.id"), nullable=False),
    Column("session_jti", String(64), nullable=True),
    Column("public_model", String(256), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("upstream_model", String(256), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("reasoning_tokens", Integer, nullable=False),
    Column("base_cost_micros", BigInteger, nullable=False),
    Column("commission_rate_bps", Integer, nullable=False),
    Column("commission_micros", BigInteger, nullable=False),
    Column("total_micros", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("streamed", Boolean, nullable=False),
    Column("usage_source", String(16), nullable=False),
    Column("latency_ms", Integer, nullable=True),
    Column("time_to_first_chunk_ms", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("status IN ('ok', 'error', 'cancelled')", name="status"),
    CheckConstraint("usage_source IN ('upstream', 'estimated')", name="usage_source"),
    CheckConstraint(
        "prompt_tokens >= 0 AND completion_tokens >= 0 AND cached_tokens >= 0"
        " AND reasoning_tokens >= 0",
        name="tokens_non_negative",
    ),
    CheckConstraint(
        "base_cost_micros >= 0 AND commission_micros >= 0"
        " AND total_micros = base_cost_micros + commission_micros",
        name="money_adds_up",
    ),
    Index("ix_usage_records_account_created", "account_id", "created_at", "id"),
)
