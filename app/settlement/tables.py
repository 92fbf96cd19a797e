"""The ``vouchers`` table: the best signed voucher each session key gave Tollgate.

It is declared on the schema's one ``MetaData`` (``app.storage.tables.metadata``), so
``compare_metadata`` and alembic see it as soon as this module is imported; migration
0005 creates it. It belongs beside the other tables in ``app.storage.tables`` and lives
here only until that module is free to take it.

A voucher is a session key's EIP-712 ``DebitVoucher``: "up to ``cumulative_micros`` in
total may be collected from this account under my key, until ``deadline``". It only
means something in the domain of the settlement contract it was signed for, so the
contract is part of the key: after a redeployment, old vouchers are simply not used.
A row is replaced only by a voucher that is not lower (``app.settlement.vouchers``):
the stored one is always the best the key ever gave.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    PrimaryKeyConstraint,
    String,
    Table,
    func,
)

from app.storage.tables import ADDRESS, metadata

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
