"""The schema as SQLAlchemy Core tables: the single source alembic migrates from.

Money columns are BIGINT micro-USD (``*_micros``; 1 micro-USD = 1 USDC base unit),
see ``app.ledger.money``. Addresses are stored lowercase ``0x`` hex. Rows that record
money (usage) are appended, never edited: a mistake is corrected by a new row.

An account's running totals are kept in step with its rows in the same statement
that writes them (``app.ledger``): ``usage_micros`` is the sum of its usage records,
``held_micros`` the sum of its open holds, ``paid_micros`` the sum of its confirmed
payments. Its balance is ``usage - paid`` (negative: prepaid credit); see
``app.ledger.balance`` for the one rule that admits a request.
"""

from __future__ import annotations

from typing import Any

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
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
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
    # Sum of the account's usage records; kept in step with usage_records.
    Column("usage_micros", BigInteger, nullable=False, server_default="0"),
    # Sum of its confirmed payments; whoever records a payment adds to it in the same
    # transaction.
    Column("paid_micros", BigInteger, nullable=False, server_default="0"),
    # Sum of its open holds; kept in step with the holds table.
    Column("held_micros", BigInteger, nullable=False, server_default="0"),
    Column("credit_limit_micros", BigInteger, nullable=False),
    # Set when a settlement of this account failed: until it is cleared the account
    # is served only on prepaid credit (its effective credit limit is 0).
    Column("settlement_failed_at", DateTime(timezone=True), nullable=True),
    # Per-account rate limit overrides; NULL means the global default.
    Column("rate_limit_requests_per_min", Integer, nullable=True),
    Column("rate_limit_tokens_per_min", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("chain_id", "smart_account", name="uq_accounts_chain_smart_account"),
    CheckConstraint("status IN ('active', 'suspended')", name="status"),
    CheckConstraint("credit_limit_micros >= 0", name="credit_limit_non_negative"),
    CheckConstraint("usage_micros >= 0", name="usage_non_negative"),
    CheckConstraint("paid_micros >= 0", name="paid_non_negative"),
    CheckConstraint("held_micros >= 0", name="held_non_negative"),
)

# Open holds: TigerBeetle's pending transfers. A hold reserves the most a request can
# cost before it is forwarded and resolves exactly once: posted (its request's usage
# record is written and the hold deleted in the same statement), voided (the request
# produced nothing) or expired (its process crashed). A hold is a reservation, not
# money: the usage record is the append-only row, so a resolved hold is deleted and
# the table stays as small as the number of requests in flight.
holds = Table(
    "holds",
    metadata,
    # Our request id, as in usage_records: one hold per request, a retry finds it.
    Column("request_id", String(64), primary_key=True),
    Column("account_id", BigInteger, ForeignKey("accounts.id"), nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("amount_micros >= 0", name="amount_non_negative"),
    Index("ix_holds_expires_at", "expires_at"),
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


def _onchain_money_columns() -> list[Any]:
    """What payments and settlements share: money that reaches Tollgate on chain under a
    unique reference (the bytes32 the settlement contract's ``Settled`` event names).

    A row is written ``pending`` before anything is sent; it becomes ``confirmed`` (its
    amount added to ``accounts.paid_micros`` in the same transaction) or ``failed``."""
    return [
        Column("id", BigInteger, Identity(), primary_key=True),
        Column("reference", String(66), nullable=False, unique=True),
        Column("account_id", BigInteger, ForeignKey("accounts.id"), nullable=False, index=True),
        Column("chain_id", BigInteger, nullable=False),
        Column("amount_micros", BigInteger, nullable=False),
        Column("status", String(16), nullable=False, server_default="pending"),
        Column("tx_hash", String(66), nullable=True),
        Column("failure_reason", Text, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("confirmed_at", DateTime(timezone=True), nullable=True),
        CheckConstraint("amount_micros > 0", name="amount_positive"),
        CheckConstraint("status IN ('pending', 'confirmed', 'failed')", name="status"),
    ]


# x402 payments received (inbound EIP-3009 authorizations).
payments = Table(
    "payments",
    metadata,
    *_onchain_money_columns(),
    Column("asset", ADDRESS, nullable=False),
    Column("payer", ADDRESS, nullable=False),
    Column("nonce", String(66), nullable=False),
    # 'onchain': the operator settled through the settlement contract; 'facilitator'.
    Column("method", String(16), nullable=False),
    Column("valid_before", DateTime(timezone=True), nullable=False),
    CheckConstraint("method IN ('onchain', 'facilitator')", name="method"),
    # An authorization pays once: its nonce is unique per chain, token and payer.
    UniqueConstraint("chain_id", "asset", "payer", "nonce", name="uq_payments_chain_id"),
)

# Debt collected from smart accounts through their session key's voucher.
settlements = Table(
    "settlements",
    metadata,
    *_onchain_money_columns(),
    Column("smart_account", ADDRESS, nullable=False),
    Column("session_key", ADDRESS, nullable=False),
    # The session key's voucher total after this collection (the contract's running sum).
    Column("cumulative_micros", BigInteger, nullable=False),
    # One collection in flight per account, enforced by Postgres, not by a worker's memory.
    Index("uq_settlements_one_pending_per_account", "account_id", unique=True,
          postgresql_where=text("status = 'pending'")),
)


# The best signed voucher each session key gave Tollgate: its EIP-712 ``DebitVoucher``
# ("up to ``cumulative_micros`` in total may be collected from this account under my
# key, until ``deadline``"). It only means something in the domain of the settlement
# contract it was signed for, so the contract is part of the key. A row is replaced
# only by a voucher that is not lower (``app.settlement.vouchers``).
# 0x + 65 bytes (r, s, v) in hex.
SIGNATURE_HEX = String(132)

vouchers = Table(
    "vouchers",
    metadata,
    Column("account_id", BigInteger, ForeignKey("accounts.id"), nullable=False),
    Column("session_key", ADDRESS, nullable=False),
    # The settlement contract whose EIP-712 domain the voucher was signed in.
    Column("settlement", ADDRESS, nullable=False),
    Column("chain_id", BigInteger, nullable=False),
    # The voucher's cumulativeAmount: USDC base units = micro-USD.
    Column("cumulative_micros", BigInteger, nullable=False),
    # The voucher's deadline (the contract's block.timestamp <= deadline), whole seconds.
    Column("deadline", DateTime(timezone=True), nullable=False),
    # r || s || v with v in {27, 28}: exactly what the contract's ECDSA accepts.
    Column("signature", SIGNATURE_HEX, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # When the stored voucher last changed: a failed account is retried only with a newer one.
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("account_id", "session_key", "settlement", name="pk_vouchers"),
    CheckConstraint("cumulative_micros > 0", name="cumulative_positive"),
)
