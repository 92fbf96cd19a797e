"""Helpers for the settlement tests: funded smart accounts with session keys on the test
session's anvil, their vouchers, usage written as the ledger writes it, and workers.

The voucher's EIP-712 types are written out here rather than imported from the app: they
are a public contract (the agent signs them), so a change on the server must break these
tests. Workers send with ``dev_chain.wallet``, the one operator wallet of the test session.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chain.client import ChainClient
from app.chain.contracts import bind_contract
from app.chain.operator import OperatorWallet
from app.settlement.contract import SettlementContract
from app.settlement.vouchers import SignedVoucher, VoucherDomain, VoucherStore
from app.settlement.worker import SettlementPolicy, SettlementWorker
from app.storage.database import create_engine
from app.storage.tables import accounts, settlements
from tests.conftest import DevChain
from tests.identity.smart_accounts import SmartAccounts

FUNDS_MICROS = 10_000_000  # 10 test USDC in each account
CREDIT_LIMIT_MICROS = 5_000_000
VOUCHER_TYPES = {
    "DebitVoucher": [
        {"name": "account", "type": "address"},
        {"name": "token", "type": "address"},
        {"name": "cumulativeAmount", "type": "uint256"},
        {"name": "deadline", "type": "uint256"},
    ]
}
SETTLED_TOPIC = keccak(text="Settled(address,uint256,uint8,bytes32)")
# Collect from 0.1 USD; tests owe more than that unless they test the rule itself.
TEST_POLICY = SettlementPolicy(threshold_micros=100_000, minimum_micros=1_000,
                               confirmation_wait_s=10)
_requests = itertools.count()


@pytest.fixture(scope="session")
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def smart_accounts(dev_chain: DevChain) -> SmartAccounts:
    return SmartAccounts(dev_chain)


def voucher_domain(dev_chain: DevChain) -> VoucherDomain:
    return VoucherDomain(chain_id=dev_chain.deployment.chain_id,
                         settlement=dev_chain.deployment.settlement,
                         token=dev_chain.deployment.token)


@dataclass
class Payer:
    """A deployed, funded smart account whose session key may pay the settlement contract."""

    owner: LocalAccount
    account: str  # checksummed
    key: LocalAccount
    account_id: int | None = None


async def new_payer(smart_accounts: SmartAccounts, *, funds_micros: int = FUNDS_MICROS
                    ) -> Payer:
    chain = smart_accounts.chain
    owner = await smart_accounts.new_owner()
    account = await smart_accounts.deploy(owner)
    key: LocalAccount = Account.create()
    await smart_accounts.grant(owner, account, key.address)
    usdc = bind_contract(chain.client.w3, "TestUSDC", chain.deployment.token)
    await chain.client.wait_for_receipt(
        await chain.wallet.transact(usdc.functions.mint(account, funds_micros)))
    return Payer(owner, account, key)


async def grant_with_cap(smart_accounts: SmartAccounts, payer: Payer, cap_micros: int) -> None:
    """Grant the payer's key again, with a cap of ``cap_micros`` per day."""
    chain = smart_accounts.chain
    valid_until_s = await smart_accounts.chain_now() + 86_400
    policy = (chain.deployment.token, chain.deployment.settlement, cap_micros, 86_400,
              valid_until_s)
    contract = bind_contract(chain.client.w3, "TollgateAccount", payer.account)
    sender = OperatorWallet(chain.client, payer.owner)
    await chain.client.wait_for_receipt(await sender.transact(
        contract.functions.grantSessionKey(payer.key.address, policy)))


def sign_voucher(dev_chain: DevChain, key: LocalAccount, account: str, cumulative_micros: int,
                 deadline_s: int) -> str:
    """The key's DebitVoucher signature, as an agent makes it from the published schema."""
    domain = {"name": "TollgateSettlement", "version": "1",
              "chainId": dev_chain.deployment.chain_id,
              "verifyingContract": dev_chain.deployment.settlement}
    message = {"account": account, "token": dev_chain.deployment.token,
               "cumulativeAmount": cumulative_micros, "deadline": deadline_s}
    signed = Account.sign_typed_data(key.key, domain, VOUCHER_TYPES, message)
    return "0x" + bytes(signed.signature).hex()


async def voucher_deadline(smart_accounts: SmartAccounts, lifetime_s: int = 6 * 3600) -> int:
    """A deadline on the chain's clock (which other tests may have moved ahead of ours)."""
    return max(await smart_accounts.chain_now(), int(time.time())) + lifetime_s


async def make_account_row(engine: AsyncEngine, payer: Payer, chain_id: int = 31337) -> int:
    """The ledger's row for the payer's account (worker tests need no signed-in session)."""
    async with engine.begin() as connection:
        payer.account_id = int((await connection.execute(
            insert(accounts).values(chain_id=chain_id, smart_account=payer.account.lower(),
                                    wallet=payer.owner.address.lower(),
                                    credit_limit_micros=CREDIT_LIMIT_MICROS)
            .returning(accounts.c.id))).scalar_one())
    return payer.account_id


async def store_voucher(engine: AsyncEngine, dev_chain: DevChain, payer: Payer,
                        cumulative_micros: int, deadline_s: int) -> None:
    """Store a voucher as ``POST /v1/vouchers`` would after its checks."""
    assert payer.account_id is not None
    signature = sign_voucher(dev_chain, payer.key, payer.account, cumulative_micros, deadline_s)
    await VoucherStore(engine, voucher_domain(dev_chain)).save(
        payer.account_id, payer.key.address,
        SignedVoucher(cumulative_micros, deadline_s, bytes.fromhex(signature[2:])))


async def add_usage(engine: AsyncEngine, account_id: int, total_micros: int,
                    *, age_s: int = 0) -> None:
    """One usage record and its account's total, in one statement, as the recorder writes."""
    async with engine.begin() as connection:
        await connection.execute(text("""
            WITH record AS (
                INSERT INTO usage_records (request_id, account_id, public_model, provider,
                    upstream_model, prompt_tokens, completion_tokens, cached_tokens,
                    reasoning_tokens, base_cost_micros, commission_rate_bps,
                    commission_micros, total_micros, status, streamed, usage_source,
                    created_at)
                VALUES (:request_id, :account_id, 'test-model', 'mock', 'mock-gpt', 1, 1, 0, 0,
                    :total, 0, 0, :total, 'ok', false, 'upstream',
                    now() - make_interval(secs => :age_s))
                RETURNING account_id, total_micros)
            UPDATE accounts SET usage_micros = usage_micros + record.total_micros
            FROM record WHERE accounts.id = record.account_id
        """), {"request_id": f"req_settle_{secrets.token_hex(6)}_{next(_requests)}",
               "account_id": account_id, "total": total_micros, "age_s": age_s})


async def account_row(engine: AsyncEngine, account_id: int) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(
            select(accounts).where(accounts.c.id == account_id))).mappings().one()


async def settlement_rows(engine: AsyncEngine, account_id: int) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(
            select(settlements).where(settlements.c.account_id == account_id)
            .order_by(settlements.c.id))).mappings())


def make_worker(engine: AsyncEngine, dev_chain: DevChain, *,
                policy: SettlementPolicy = TEST_POLICY, client: ChainClient | None = None,
                operator: OperatorWallet | None = None) -> SettlementWorker:
    """A worker on the test chain; by default it sends with the session's operator wallet."""
    return SettlementWorker(
        engine, SettlementContract(client or dev_chain.client, dev_chain.deployment.settlement),
        operator or dev_chain.wallet, VoucherStore(engine, voucher_domain(dev_chain)),
        confirmations=1, policy=policy)


async def collected_on_chain(dev_chain: DevChain, payer: Payer) -> int:
    settlement = bind_contract(dev_chain.client.w3, "TollgateSettlement",
                               dev_chain.deployment.settlement)
    return int(await dev_chain.client.read(
        settlement.functions.collected(payer.account, payer.key.address)))


async def usdc_balance(dev_chain: DevChain, address: str) -> int:
    usdc = bind_contract(dev_chain.client.w3, "TestUSDC", dev_chain.deployment.token)
    return int(await dev_chain.client.read(usdc.functions.balanceOf(address)))


async def settled_events(dev_chain: DevChain, reference: str) -> list[Any]:
    """Every Settled event of ``reference`` since the chain began."""
    return list(await dev_chain.client.w3.eth.get_logs({
        "address": to_checksum_address(dev_chain.deployment.settlement),
        "topics": [HexBytes(SETTLED_TOPIC).to_0x_hex(), None, reference],  # type: ignore[list-item]
        "fromBlock": 0, "toBlock": "latest",
    }))
