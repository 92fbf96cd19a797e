"""Balances and holds: usage, payments and open holds per account; the holds table.

``accounts.debt_micros`` becomes ``usage_micros`` (it always summed the usage
records; "debt" now means ``usage - paid``, which is computed, not stored).
``paid_micros`` and ``held_micros`` start at 0: no payment has been recorded and
no hold exists before this revision.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHECKS = (
    ("usage_non_negative", "usage_micros >= 0"),
    ("paid_non_negative", "paid_micros >= 0"),
    ("held_non_negative", "held_micros >= 0"),
)


def upgrade() -> None:
    op.alter_column("accounts", "debt_micros", new_column_name="usage_micros")
    op.add_column("accounts", sa.Column("paid_micros", sa.BigInteger(), server_default="0",
                                        nullable=False))
    op.add_column("accounts", sa.Column("held_micros", sa.BigInteger(), server_default="0",
                                        nullable=False))
    op.add_column("accounts", sa.Column("settlement_failed_at", sa.DateTime(timezone=True),
                                        nullable=True))
    for name, condition in _CHECKS:
        op.create_check_constraint(op.f(f"ck_accounts_{name}"), "accounts", condition)
    op.create_table(
        "holds",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount_micros >= 0", name=op.f("ck_holds_amount_non_negative")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"],
                                name=op.f("fk_holds_account_id_accounts")),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_holds")),
    )
    op.create_index("ix_holds_expires_at", "holds", ["expires_at"], unique=False)


def downgrade() -> None:
    # Open holds are reservations, not money: dropping them loses nothing recorded.
    # Payments recorded in paid_micros are lost with the column; a downgrade past a
    # payment is refused rather than silently forgetting it.
    op.execute(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM accounts WHERE paid_micros <> 0) THEN"
        " RAISE EXCEPTION 'accounts have recorded payments; refusing to drop paid_micros';"
        " END IF; END $$"
    )
    op.drop_index("ix_holds_expires_at", table_name="holds")
    op.drop_table("holds")
    for name, _ in reversed(_CHECKS):
        op.drop_constraint(op.f(f"ck_accounts_{name}"), "accounts", type_="check")
    op.drop_column("accounts", "settlement_failed_at")
    op.drop_column("accounts", "held_micros")
    op.drop_column("accounts", "paid_micros")
    op.alter_column("accounts", "usage_micros", new_column_name="debt_micros")
