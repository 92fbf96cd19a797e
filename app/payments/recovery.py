"""Finishing payments that were left ``pending``: a confirmation that timed out, a chain or
facilitator that went away mid-settlement, a process that died.

The payer may retry with the same header (which resumes the payment), but nothing may
depend on that: this pass runs in the background of every serve and settles each
pending payment from what the chain says.
  - a transaction hash is known: its receipt confirms the payment (N blocks deep), or a
    revert fails it, unless the authorization was used on chain anyway;
  - no transaction hash: if the token says the authorization's nonce is used, the funds
    reached the settlement contract (``to`` is signed), so it is confirmed; if it is not
    used and the authorization has expired, nobody can ever use it: failed;
  - otherwise it is still in flight and left alone.
The row does not hold the payer's signature, so this pass never submits anything.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from eth_utils import to_checksum_address
from hexbytes import HexBytes
from sqlalchemy import select

from app.chain.contracts import bind_contract
from app.chain.errors import ChainError, ConfirmationTimeout, TransactionReverted
from app.payments import ledger
from app.payments.service import PaymentService
from app.storage.tables import payments

# A payment younger than this is probably still being driven by its request.
RESUME_AFTER_S = 60
RESUME_BATCH = 100
RESUME_INTERVAL_S = 30.0
# A pass looks, it does not wait: a receipt not deep enough now is looked at next pass.
RECEIPT_LOOK_S = 0.5


@dataclass(frozen=True, slots=True)
class Resumed:
    confirmed: int = 0
    failed: int = 0
    still_pending: int = 0


async def resume_pending(service: PaymentService, *, older_than_s: float = RESUME_AFTER_S
                         ) -> Resumed:
    """One pass over the pending payments older than ``older_than_s``."""
    cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
    async with service.engine.connect() as connection:
        rows = (await connection.execute(
            select(payments.c.reference, payments.c.payer, payments.c.nonce,
                   payments.c.tx_hash, payments.c.valid_before)
            .where(payments.c.status == "pending", payments.c.created_at <= cutoff,
                   payments.c.chain_id == service.asset.chain_id)
            .order_by(payments.c.id).limit(RESUME_BATCH)
        )).all()
    confirmed = failed = pending = 0
    for row in rows:
        try:
            outcome = await _resume_one(service, row.reference, row.payer, row.nonce,
                                        row.tx_hash, row.valid_before)
        except ChainError as error:
            logging.getLogger(__name__).warning("payment %s not resumed: %s", row.reference,
                                                error)
            outcome = "pending"
        confirmed += outcome == "confirmed"
        failed += outcome == "failed"
        pending += outcome == "pending"
    return Resumed(confirmed, failed, pending)


async def _resume_one(service: PaymentService, reference: str, payer: str, nonce: str,
                      tx_hash: str | None, valid_before: datetime) -> str:
    if tx_hash is not None:
        try:
            await service.client.wait_for_receipt(tx_hash, confirmations=service.confirmations,
                                                  timeout_s=RECEIPT_LOOK_S)
        except TransactionReverted as reverted:
            if not await _nonce_used(service, payer, nonce):
                await ledger.fail(service.engine, reference,
                                  reverted.error_name or "the settlement reverted")
                return "failed"
            tx_hash = None
        except ConfirmationTimeout:
            return "pending"
        await ledger.confirm(service.engine, reference, tx_hash)
        return "confirmed"
    if await _nonce_used(service, payer, nonce):
        await ledger.confirm(service.engine, reference, None)
        return "confirmed"
    if valid_before <= datetime.now(UTC):
        await ledger.fail(service.engine, reference,
                          "the authorization expired before it was settled")
        return "failed"
    return "pending"


async def _nonce_used(service: PaymentService, payer: str, nonce: str) -> bool:
    token = bind_contract(service.client.w3, "TestUSDC", service.asset.address)
    return bool(await service.client.read(
        token.functions.authorizationState(to_checksum_address(payer), HexBytes(nonce))))


async def run_forever(service: PaymentService) -> None:
    """The background pass of a serve: never dies, stops when cancelled."""
    log = logging.getLogger(__name__)
    while True:
        try:
            resumed = await resume_pending(service)
            if resumed.confirmed or resumed.failed:
                log.info("pending payments resumed: %s", resumed)
        except Exception:
            log.exception("resuming pending payments failed; next pass in %.0f s",
                          RESUME_INTERVAL_S)
        await asyncio.sleep(RESUME_INTERVAL_S)
