"""Payments (x402, inbound) and settlements (collections from smart accounts).

Both are money that reaches Tollgate on chain, each under a unique reference (the
bytes32 the settlement contract's ``Settled`` event names), so reconciliation can
match every row to one event. A row is written ``pending`` before anything is sent,
and becomes ``confirmed`` (adding its amount to ``accounts.paid_micros`` in the same
transaction) or ``failed`` with its reason.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUS = "status IN ('pending', 'confirmed', 'failed')"


def _common(table: str) -> list[sa.SchemaItem]:
    return [
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("reference", sa.String(length=66), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("tx_hash", sa.String(length=66), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount_micros > 0", name=op.f(f"ck_{table}_amount_positive")),
        sa.CheckConstraint(_STATUS, name=op.f(f"ck_{table}_status")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"],
                                name=op.f(f"fk_{table}_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
        sa.UniqueConstraint("reference", name=op.f(f"uq_{table}_reference")),
    ]


def upgrade() -> None:
    op.create_table(
        "payments",
        *_common("payments"),
        sa.Column("asset", sa.String(length=42), nullable=False),
        sa.Column("payer", sa.String(length=42), nullable=False),
        sa.Column("nonce", sa.String(length=66), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("valid_before", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("method IN ('onchain', 'facilitator')",
                           name=op.f("ck_payments_method")),
        # An authorization pays once: its nonce is unique per chain, token and payer.
        sa.UniqueConstraint("chain_id", "asset", "payer", "nonce",
                            name=op.f("uq_payments_chain_id")),
    )
    op.create_index("ix_payments_account_id", "payments", ["account_id"])
    op.create_table(
        "settlements",
        *_common("settlements"),
        sa.Column("smart_account", sa.String(length=42), nullable=False),
        sa.Column("session_key", sa.String(length=42), nullable=False),
        # The session key's voucher total after this collection (the contract's running sum).
        sa.Column("cumulative_micros", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_settlements_account_id", "settlements", ["account_id"])
    # One collection in flight per account, enforced by Postgres, not by a worker's memory.
    op.create_index("uq_settlements_one_pending_per_account", "settlements", ["account_id"],
                    unique=True, postgresql_where=sa.text("status = 'pending'"))


def downgrade() -> None:
    op.execute(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM payments) OR EXISTS (SELECT 1 FROM settlements)"
        " THEN RAISE EXCEPTION 'payments or settlements are recorded; refusing to drop them';"
        " END IF; END $$"
    )
    op.drop_index("uq_settlements_one_pending_per_account", table_name="settlements")
    op.drop_index("ix_settlements_account_id", table_name="settlements")
    op.drop_table("settlements")
    op.drop_index("ix_payments_account_id", table_name="payments")
    op.drop_table("payments")
