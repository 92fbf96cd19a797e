"""Accepting an x402 payment exactly once, and asking for one.

A proof goes through, in order:
  1. its terms (scheme, network, asset, payTo, amount, validity window) against what
     Tollgate asks for now (``checks.py``), and its signature (EOA, ERC-1271, ERC-6492):
     refusals are 402 with the reason and a fresh requirement;
  2. the replay store: the authorization's reference is reserved in Redis (``SET NX``)
     before anything else, then written ``pending`` in Postgres, where it is unique per
     chain + asset + payer + nonce: only one request ever drives a given payment;
  3. settlement (on chain through the settlement contract, or a facilitator), then
     N confirmations, then one statement that confirms the row and credits the account.

A payment already recorded is never asked for again as if it were new: a replay of a
confirmed or failed one is a 402 that says so; one still pending (settling in another
request, or its confirmation timed out) is a 503 ``payment_pending`` with Retry-After,
and retrying with the same header resumes it where it stopped. Resuming is safe: the
token accepts a nonce once and the settlement contract a reference once, so a second
submission can only fail, and a failure whose nonce is used on chain is a payment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import redis.asyncio as redis
from sqlalchemy.ext.asyncio import AsyncEngine
from x402.http.constants import PAYMENT_RESPONSE_HEADER
from x402.http.utils import encode_payment_response_header
from x402.schemas import SettleResponse

from app.chain.client import ChainClient
from app.chain.errors import ChainError, TransactionReverted
from app.chain.signatures import ERC6492_SUFFIX, verify_signature
from app.errors import CreditLimitExceeded, PaymentRequired, ServiceUnavailable
from app.payments import ledger
from app.payments.assets import PaymentAsset
from app.payments.checks import Asked, authorization_digest, check_proof
from app.payments.proof import PaymentProof
from app.payments.requirements import X402PaymentRequiredError, payment_required, requirement
from app.payments.settle import (
    AlreadyUsed,
    OnchainSettler,
    SettlementRefused,
    Settler,
    payment_reference,
)

log = logging.getLogger(__name__)

RESERVATION_KEY = "tg:x402:{{{reference}}}:driver"
# How long one request may drive a payment before another may take over (a crashed
# driver's reservation expires).
RESERVATION_TTL_S = 120
# How long a request waits for a payment another request is settling.
PENDING_WAIT_S = 30.0
PENDING_POLL_S = 0.05
RETRY_AFTER_S = 5


@dataclass(frozen=True, slots=True)
class PaymentReceipt:
    reference: str
    tx_hash: str | None
    amount_micros: int
    payer: str

    def header(self, network: str) -> dict[str, str]:
        response = SettleResponse(success=True, transaction=self.tx_hash or "", network=network,
                                  payer=self.payer, amount=str(self.amount_micros))
        return {PAYMENT_RESPONSE_HEADER: encode_payment_response_header(response)}


class PaymentService:
    def __init__(self, *, engine: AsyncEngine, redis_client: redis.Redis, client: ChainClient,
                 asset: PaymentAsset, pay_to: str, settler: Settler,
                 factory_allowlist: set[str], confirmations: int, min_topup_micros: int,
                 receipt_timeout_s: float = 120.0) -> None:
        assert min_topup_micros > 0 and confirmations >= 0
        self.engine = engine
        self.redis = redis_client
        self.client = client
        self.asset = asset
        self.pay_to = pay_to
        self.settler = settler
        self.factory_allowlist = factory_allowlist
        self.confirmations = confirmations
        self.min_topup_micros = min_topup_micros
        self.receipt_timeout_s = receipt_timeout_s

    # ------------------------------------------------------------------ asking

    def ask(self, message: str, amount_micros: int, resource_url: str,
            code: str = "payment_required") -> X402PaymentRequiredError:
        return payment_required(message, asset=self.asset, pay_to=self.pay_to,
                                amount_micros=max(amount_micros, self.min_topup_micros),
                                resource_url=resource_url, code=code)

    def ask_for(self, refusal: CreditLimitExceeded, resource_url: str
                ) -> X402PaymentRequiredError:
        """The x402 answer to a refusal of the balance rule: what is owed, or the minimum
        top-up, and never less than what admits the request."""
        owed = max(refusal.balance_micros, 0)
        amount = max(owed, refusal.payment_required_micros)
        return self.ask(refusal.message, amount, resource_url, code=refusal.code or
                        "credit_limit_exceeded")

    # --------------------------------------------------------------- verifying

    async def verify(self, proof: PaymentProof, min_amount_micros: int) -> None:
        """Terms and signature, or a 402 naming what is wrong (the caller adds the ask)."""
        check_proof(proof, Asked(self.asset, self.pay_to, min_amount_micros), int(time.time()))
        if proof.signature.endswith(ERC6492_SUFFIX):
            # The signature would verify (we read ERC-6492), but USDC's
            # transferWithAuthorization cannot deploy the account first, so settling it
            # would fail after the payer was told yes.
            raise PaymentRequired(
                "payment refused: an undeployed smart account cannot pay by EIP-3009;"
                " deploy it first (ERC-6492 signatures are accepted for sign-in only)",
                code="payment_account_not_deployed")
        digest = authorization_digest(proof, self.asset)
        try:
            valid = await verify_signature(self.client, proof.payer, digest, proof.signature,
                                           factory_allowlist=self.factory_allowlist)
        except ChainError as error:
            raise _chain_unavailable(error) from None
        if not valid:
            raise PaymentRequired("payment refused: the signature is not the payer's",
                                  code="payment_invalid_signature")

    # --------------------------------------------------------------- accepting

    async def accept(self, proof: PaymentProof, account_id: int) -> PaymentReceipt:
        """Settle a verified proof and credit ``account_id``, exactly once."""
        reference = payment_reference(proof, self.asset)
        # Reserved before anything else: only the request holding the reservation drives
        # this payment; every other one waits for its outcome.
        if not await self._reserve(reference):
            return await self._outcome_of_another(reference, proof)
        try:
            recorded = await ledger.record_pending(self.engine, ledger.NewPayment(
                reference=reference, account_id=account_id, chain_id=self.asset.chain_id,
                asset=self.asset.address, payer=proof.payer, nonce="0x" + proof.nonce.hex(),
                amount_micros=proof.value, method=self.settler.method,
                valid_before_s=proof.valid_before,
            ))
            if not recorded:
                row = await ledger.find(self.engine, reference)
                if row is None or row.status != "pending":
                    return self._settled_receipt_or_refusal(row, proof)
            return await self._drive(reference, proof)
        finally:
            await self._release(reference)

    async def _drive(self, reference: str, proof: PaymentProof) -> PaymentReceipt:
        """Bring a pending payment to confirmed or failed (or leave it pending: 503)."""
        row = await ledger.find(self.engine, reference)
        assert row is not None and row.status == "pending"
        tx_hash = row.tx_hash
        try:
            if tx_hash is None:
                tx_hash = await self._submit(reference, proof)
            if tx_hash is not None:
                await self.client.wait_for_receipt(tx_hash, confirmations=self.confirmations,
                                                   timeout_s=self.receipt_timeout_s)
        except SettlementRefused as refused:
            await ledger.fail(self.engine, reference, refused.reason)
            raise PaymentRequired(f"payment refused: the settlement failed ({refused.reason})",
                                  code="payment_failed") from None
        except TransactionReverted as reverted:
            if await self._used_on_chain(proof):
                tx_hash = None  # someone else's submission carried it
            else:
                reason = reverted.error_name or "the settlement reverted"
                await ledger.fail(self.engine, reference, reason)
                raise PaymentRequired(f"payment refused: the settlement failed ({reason})",
                                      code="payment_failed") from None
        except ChainError as error:
            # Sent or not, we cannot tell now: the row stays pending, and a retry with
            # the same header resumes it. Never a 402: the payer may already have paid.
            log.warning("payment %s left pending: %s: %s", reference, type(error).__name__,
                        error)
            raise _pending(reference, f"{type(error).__name__}: {error}") from None
        await ledger.confirm(self.engine, reference, tx_hash)
        return PaymentReceipt(reference, tx_hash, proof.value, proof.payer)

    async def _submit(self, reference: str, proof: PaymentProof) -> str | None:
        """Send the settlement; None when the authorization was already used on chain."""
        accepted = requirement(self.asset, self.pay_to, proof.value)
        try:
            tx_hash = await self.settler.settle(proof, accepted, reference)
        except AlreadyUsed:
            return None
        await ledger.set_tx_hash(self.engine, reference, tx_hash)
        return tx_hash

    async def _used_on_chain(self, proof: PaymentProof) -> bool:
        if isinstance(self.settler, OnchainSettler):
            return await self.settler.authorization_used(proof)
        return False

    async def _outcome_of_another(self, reference: str, proof: PaymentProof
                                  ) -> PaymentReceipt:
        """Another request drives this payment: wait for its outcome, bounded."""
        deadline = time.monotonic() + PENDING_WAIT_S
        while True:
            row = await ledger.find(self.engine, reference)
            if row is not None and row.status != "pending":
                return self._settled_receipt_or_refusal(row, proof)
            if time.monotonic() > deadline:
                raise _pending(reference)
            # Another process drives it; the row is the only signal we share with it.
            await asyncio.sleep(PENDING_POLL_S)

    def _settled_receipt_or_refusal(self, row: ledger.PaymentRow | None, proof: PaymentProof
                                    ) -> PaymentReceipt:
        if row is None:
            # The reference exists under another nonce's row: impossible by construction.
            raise AssertionError("a payment reference without its row")
        if row.status == "failed":
            raise PaymentRequired(
                f"payment refused: this authorization already failed ({row.failure_reason})",
                code="payment_failed")
        raise PaymentRequired(
            "payment refused: this authorization was already used; it was credited once",
            code="payment_already_used")

    async def _reserve(self, reference: str) -> bool:
        try:
            return bool(await self.redis.set(RESERVATION_KEY.format(reference=reference), "1",
                                             nx=True, ex=RESERVATION_TTL_S))
        except (redis.RedisError, OSError):
            # Postgres still makes the payment unique; without Redis two requests may
            # drive the same pending payment, which the chain resolves (nonce once).
            return True

    async def _release(self, reference: str) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            await self.redis.delete(RESERVATION_KEY.format(reference=reference))


def _pending(reference: str, cause: str | None = None) -> ServiceUnavailable:
    why = f" ({cause})" if cause else ""
    return ServiceUnavailable(
        f"payment {reference} is not settled yet{why}; retry with the same payment header"
        " (it is never charged twice)",
        code="payment_pending", headers={"Retry-After": str(RETRY_AFTER_S)})


def _chain_unavailable(error: ChainError) -> ServiceUnavailable:
    return ServiceUnavailable(f"the chain could not be asked ({type(error).__name__})",
                              code="chain_unavailable",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
