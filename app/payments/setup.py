"""Installs x402 payments when a chain is configured: the service (at startup, once the
chain client exists), the pipeline stage that accepts a payment before the hold is
taken, and ``PAYMENTS`` for the chat route's 402 answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from app.chain.config import ChainConfig
from app.chain.errors import ChainError
from app.errors import PaymentRequired
from app.http.keys import CHAIN, DATABASE, OPERATOR, REDIS, SETTINGS
from app.identity.principal import PRINCIPAL, Principal
from app.ledger.balance import read_balance
from app.ledger.holds import max_cost_micros
from app.payments import ledger
from app.payments.assets import read_payment_asset
from app.payments.proof import read_payment_proof
from app.payments.recovery import run_forever
from app.payments.service import PaymentService
from app.payments.settle import FacilitatorSettler, OnchainSettler, Settler, payment_reference
from app.proxy.pipeline import ChatCall, Stage

log = logging.getLogger(__name__)

PAYMENTS = web.AppKey("payments", PaymentService)
FACILITATOR_SESSION = web.AppKey("facilitator_session", aiohttp.ClientSession)


def setup_payments(app: web.Application, chain: ChainConfig | None) -> Stage | None:
    """None without a chain: sessions only, no x402."""
    if chain is None:
        return None
    stage = PaymentsStage()

    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        client = app[CHAIN]
        try:
            asset = await read_payment_asset(client, chain.token)
        except ChainError as error:
            raise RuntimeError(f"cannot read the payment token {chain.token}: {error}") from None
        session: aiohttp.ClientSession | None = None
        settler: Settler
        if settings.x402_facilitator_url is not None:
            session = aiohttp.ClientSession()
            settler = FacilitatorSettler(session, settings.x402_facilitator_url,
                                         settings.x402_facilitator_timeout_s)
        elif OPERATOR in app:
            settler = OnchainSettler(client, app[OPERATOR], chain.settlement, asset)
        else:
            log.warning("x402 payments are off: no TOLLGATE_X402_FACILITATOR_URL and no"
                        " TOLLGATE_OPERATOR_PRIVATE_KEY to settle them")
            yield
            return
        service = PaymentService(
            engine=app[DATABASE], redis_client=app[REDIS], client=client, asset=asset,
            pay_to=chain.settlement, settler=settler,
            factory_allowlist=set(chain.account_factories),
            confirmations=chain.confirmations, min_topup_micros=settings.x402_min_topup_micros,
        )
        app[PAYMENTS] = service
        stage.service = service
        stage.commission_bps = settings.commission_bps
        resumer = asyncio.ensure_future(run_forever(service))
        yield
        resumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resumer
        if session is not None:
            await session.close()

    app.cleanup_ctx.append(context)
    return stage


def resource_url(request: web.Request) -> str:
    return str(request.url.with_query(None))


async def x402_caller(request: web.Request) -> Principal | None:
    """The payer behind a request that carries a payment proof and no session.

    The proof's terms (all but the amount, which depends on the body) and its signature
    are checked before an account is made for the payer, so a forged proof creates
    nothing. None: no proof either (the caller is asked to pay once the body is read).
    """
    service = request.app[PAYMENTS]
    proof = read_payment_proof(request.headers)
    if proof is None:
        return None
    try:
        await service.verify(proof, min_amount_micros=1)
    except PaymentRequired as refused:
        raise service.ask(refused.message, service.min_topup_micros, resource_url(request),
                          code=refused.code or "payment_required") from None
    account_id = await ledger.payer_account(request.app[DATABASE], service.asset.chain_id,
                                            proof.payer)
    reference = payment_reference(proof, service.asset)
    principal = Principal(
        account_id=account_id, chain_id=service.asset.chain_id, wallet=proof.payer,
        smart_account=proof.payer, session_jti=f"x402:{reference[:18]}",
        session_key=proof.payer,
    )
    request[PRINCIPAL] = principal
    return principal


class PaymentsStage:
    """Accepts the request's payment (if it carries one) before the ledger takes its hold."""

    name = "payments"

    def __init__(self) -> None:
        self.service: PaymentService | None = None  # set at startup
        self.commission_bps = 0

    async def admit(self, call: ChatCall) -> None:
        service = self.service
        principal = call.principal
        if service is None or principal is None:
            return
        proof = read_payment_proof(call.http.headers)
        if proof is None:
            return
        url = resource_url(call.http)
        asked = await self._asked(call, principal.account_id)
        try:
            await service.verify(proof, asked)
            receipt = await service.accept(proof, principal.account_id)
        except PaymentRequired as refused:
            raise service.ask(refused.message, asked, url,
                              code=refused.code or "payment_required") from None
        call.response_headers.update(receipt.header(service.asset.network))

    async def _asked(self, call: ChatCall, account_id: int) -> int:
        """What this request needs paid now: the minimum top-up, or more if that would not
        admit it."""
        assert self.service is not None
        balance = await read_balance(call.http.app[DATABASE], account_id)
        cost = max_cost_micros(call, self.commission_bps)
        shortfall = balance.balance_micros + balance.held_micros + cost \
            - balance.effective_credit_limit_micros
        return max(self.service.min_topup_micros, shortfall)

    async def settle(self, call: ChatCall) -> None:
        return None
