"""Vouchers: the best signed DebitVoucher each session key gave Tollgate.

One row per (account, session key, settlement contract): the key's cumulative total,
its deadline and signature, replaced only by a voucher that is not lower. The
settlement worker collects through these (``app.settlement``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "vouchers",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("session_key", sa.String(length=42), nullable=False),
        sa.Column("settlement", sa.String(length=42), nullable=False),
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("cumulative_micros", sa.BigInteger(), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("signature", sa.String(length=132), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.CheckConstraint("cumulative_micros > 0",
                           name=op.f("ck_vouchers_cumulative_positive")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"],
                                name=op.f("fk_vouchers_account_id_accounts")),
        sa.PrimaryKeyConstraint("account_id", "session_key", "settlement",
                                name=op.f("pk_vouchers")),
    )


def downgrade() -> None:
    # A voucher is the agent's signed consent; dropping it loses nothing that was collected
    # (settlements keep their own rows), but the worker can no longer collect until the agent
    # posts again. That is an operator's choice, so it is allowed.
    op.drop_table("vouchers")
