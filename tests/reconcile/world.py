"""A ledger and a chain of a test's own: a fresh database (a copy of a migrated template) on
the session's Postgres server, and a fresh anvil with Tollgate's contracts deployed.

Reconciliation reads the whole ledger and every event of the settlement contract, so a
test that shares either with other tests could not say "everything reconciles". Both
cost well under a second: copying a template is a file copy, and anvil starts in
~0.1 s.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import insert, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chain.client import ChainClient
from app.chain.config import ChainConfig
from app.chain.contracts import bind_contract
from app.chain.deploy import Deployment, deploy_tollgate
from app.chain.operator import OperatorWallet
from app.devstack.anvil import DEV_CHAIN_ID, Anvil
from app.reconcile.chain_logs import ChainLogs
from app.reconcile.reconciler import reconcile
from app.reconcile.report import Report
from app.storage.database import create_engine, migrate
from app.storage.tables import accounts, payments
from tests.conftest import ANVIL_OPERATOR_KEY


def database_url(server_url: str, name: str) -> str:
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def _on_server(server_url: str, statement: str) -> None:
    server = create_engine(server_url)
    try:
        async with server.execution_options(isolation_level="AUTOCOMMIT").connect() as connection:
            await connection.execute(text(statement))
    finally:
        await server.dispose()


@pytest.fixture(scope="session")
async def ledger_template(postgres_url: str) -> AsyncIterator[str]:
    """A migrated, empty database that each test's ledger is copied from."""
    name = f"reconcile_template_{secrets.token_hex(4)}"
    await _on_server(postgres_url, f"CREATE DATABASE {name}")
    await asyncio.to_thread(migrate, database_url(postgres_url, name))
    yield name
    await _on_server(postgres_url, f"DROP DATABASE {name} WITH (FORCE)")


@dataclass
class World:
    database_url: str
    engine: AsyncEngine
    anvil_url: str
    client: ChainClient
    operator: OperatorWallet
    deployment: Deployment

    def chain_config(self, **overrides: Any) -> ChainConfig:
        values: dict[str, Any] = {
            "rpc_url": self.anvil_url, "chain_id": DEV_CHAIN_ID,
            "token": self.deployment.token, "settlement": self.deployment.settlement,
            "account_factories": (self.deployment.factory,),
            "operator_private_key": ANVIL_OPERATOR_KEY,
        }
        values.update(overrides)
        return ChainConfig(**values)

    def chain_environment(self) -> dict[str, str]:
        """The settings that point ``tollgate`` at this ledger and chain."""
        return {
            "DATABASE_URL": self.database_url, "TOLLGATE_CHAIN_RPC_URL": self.anvil_url,
            "TOLLGATE_CHAIN_ID": str(DEV_CHAIN_ID), "TOLLGATE_CHAIN_IDS": str(DEV_CHAIN_ID),
            "TOLLGATE_TOKEN_ADDRESS": self.deployment.token,
            "TOLLGATE_SETTLEMENT_ADDRESS": self.deployment.settlement,
        }

    def logs(self) -> ChainLogs:
        return ChainLogs(self.client, settlement=self.deployment.settlement,
                         token=self.deployment.token)

    async def report(self, **options: Any) -> Report:
        return await reconcile(self.engine, self.logs(), **options)


@pytest.fixture
async def world(postgres_url: str, ledger_template: str) -> AsyncIterator[World]:
    name = f"reconcile_{secrets.token_hex(4)}"
    await _on_server(postgres_url, f"CREATE DATABASE {name} TEMPLATE {ledger_template}")
    anvil = Anvil(None)
    anvil_url = await asyncio.to_thread(anvil.start)
    client = await ChainClient.connect(anvil_url, DEV_CHAIN_ID, poll_interval_s=0.01)
    operator = OperatorWallet(client, Account.from_key(ANVIL_OPERATOR_KEY))
    url = database_url(postgres_url, name)
    engine = create_engine(url)
    try:
        deployment = await deploy_tollgate(client, operator, treasury=Account.create().address)
        yield World(url, engine, anvil_url, client, operator, deployment)
    finally:
        await engine.dispose()
        await client.close()
        await asyncio.to_thread(anvil.stop)
        await _on_server(postgres_url, f"DROP DATABASE {name} WITH (FORCE)")


# --------------------------------------------------------------------------- the ledger


def new_reference() -> str:
    return "0x" + secrets.token_hex(32)


async def new_account(engine: AsyncEngine, address: str | None = None) -> int:
    address = (address or Account.create().address).lower()
    async with engine.begin() as connection:
        result = await connection.execute(
            insert(accounts).values(chain_id=DEV_CHAIN_ID, smart_account=address,
                                    wallet=address, credit_limit_micros=0)
            .returning(accounts.c.id))
        return int(result.scalar_one())


async def record_payment(engine: AsyncEngine, *, account_id: int, reference: str, amount: int,
                         payer: str, tx_hash: str | None, status: str = "confirmed",
                         method: str = "onchain") -> None:
    """A payment row as the payment flow leaves it; a confirmed one is credited to its
    account in the same transaction, as the ledger's rule says."""
    async with engine.begin() as connection:
        await connection.execute(insert(payments).values(
            reference=reference, account_id=account_id, chain_id=DEV_CHAIN_ID,
            amount_micros=amount, status=status, tx_hash=tx_hash,
            asset="0x" + "00" * 20, payer=payer.lower(), nonce=new_reference(), method=method,
            valid_before=text("now() + interval '1 hour'"),
            confirmed_at=text("now()") if status == "confirmed" else None,
        ))
        if status == "confirmed":
            await connection.execute(
                update(accounts).where(accounts.c.id == account_id)
                .values(paid_micros=accounts.c.paid_micros + amount))


async def execute(engine: AsyncEngine, statement: str, **parameters: Any) -> None:
    """Change the ledger behind its back (what tampering or a bug would do)."""
    async with engine.begin() as connection:
        await connection.execute(text(statement), parameters)


# --------------------------------------------------------------------------- the chain

_AUTHORIZATION_TYPES = {"TransferWithAuthorization": [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]}


@dataclass(frozen=True)
class TransferAuthorization:
    """An EIP-3009 TransferWithAuthorization to the settlement contract, signed."""

    payer: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes
    signature: bytes


async def funded_payer(world: World, amount: int) -> LocalAccount:
    """A new wallet holding `amount` TestUSDC (the operator owns the token, so it mints)."""
    payer = Account.create()
    token = bind_contract(world.client.w3, "TestUSDC", world.deployment.token)
    await mined(world, await world.operator.transact(token.functions.mint(payer.address, amount)))
    return payer


def authorize_transfer(world: World, payer: LocalAccount, value: int) -> TransferAuthorization:
    valid_before, nonce = int(time.time()) + 3600, secrets.token_bytes(32)
    message = {"from": payer.address, "to": world.deployment.settlement, "value": value,
               "validAfter": 0, "validBefore": valid_before, "nonce": nonce}
    domain = {"name": "USD Coin", "version": "2", "chainId": DEV_CHAIN_ID,
              "verifyingContract": world.deployment.token}
    signed = Account.sign_typed_data(payer.key, domain, _AUTHORIZATION_TYPES, message)
    return TransferAuthorization(payer.address, value, 0, valid_before, nonce,
                                 bytes(signed.signature))


async def mined(world: World, tx_hash: Any) -> str:
    receipt = await world.client.wait_for_receipt(tx_hash)
    return str(receipt["transactionHash"].to_0x_hex())


async def settle_payment(world: World, authorization: TransferAuthorization,
                         reference: str) -> str:
    """The operator settles through the contract (``Settled`` with `reference`)."""
    settlement = bind_contract(world.client.w3, "TollgateSettlement",
                               world.deployment.settlement)
    call = settlement.functions.settleWithTransferAuthorization(
        authorization.payer, authorization.value, authorization.valid_after,
        authorization.valid_before, authorization.nonce, authorization.signature,
        bytes.fromhex(reference[2:]))
    return await mined(world, await world.operator.transact(call))


async def transfer_directly(world: World, authorization: TransferAuthorization) -> str:
    """The authorization submitted to the token itself, as an x402 facilitator does: the
    money reaches the settlement contract with a Transfer log and no Settled event."""
    token = bind_contract(world.client.w3, "TestUSDC", world.deployment.token)
    call = token.functions.transferWithAuthorization(
        authorization.payer, world.deployment.settlement, authorization.value,
        authorization.valid_after, authorization.valid_before, authorization.nonce,
        authorization.signature)
    return await mined(world, await world.operator.transact(call))


async def paid_on_chain(world: World, amount: int, *, reference: str | None = None
                        ) -> tuple[LocalAccount, str, str]:
    """A payer settles `amount` through the contract: (payer, reference, tx hash)."""
    payer = await funded_payer(world, amount)
    reference = reference or new_reference()
    tx_hash = await settle_payment(world, authorize_transfer(world, payer, amount), reference)
    return payer, reference, tx_hash
