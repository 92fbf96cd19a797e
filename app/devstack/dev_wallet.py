"""``tollgate dev-wallet``: a development wallet and a ready session token.

This is a *client*: it keeps its private keys on this machine (in the state dir,
mode 0600), reads the typed-data schema the server publishes, signs an
Authorization, and posts only the signature to ``POST /v1/authorize``. No private
key ever reaches the server.

When ``tollgate serve`` of the same state dir runs a dev chain, the wallet is the
whole setup a user of a real chain would have, on the dev chain: the EOA (the
owner) holds ETH and test USDC; its smart account, created by Tollgate's factory,
holds test USDC too; a persisted session key is granted on chain to pay Tollgate's
settlement contract within a cap; and the *session key* signs the Authorization, so
the server checks it exactly as it would an agent's. Each run tops up what is
missing and reuses the rest, so a second run sends no transaction.

Without a dev chain the EOA signs for itself with a fresh session key each run.
Dev keys are for the dev chain only; never fund them anywhere else.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import Hash32
from eth_utils import to_checksum_address
from hexbytes import HexBytes

from app.chain.client import ChainClient
from app.chain.contracts import bind_contract
from app.chain.deploy import Deployment
from app.chain.operator import OperatorWallet
from app.devstack.anvil import DEV_CHAIN_ID
from app.devstack.dev_chain import (
    DEV_OPERATOR_KEY,
    DEV_POLL_INTERVAL_S,
    DevChainLocation,
    find_dev_chain,
)
from app.settlement.vouchers import VoucherDomain

WALLET_FILE = "dev-wallet.json"
SESSION_KEY_FILE = "dev-session-key.json"
SESSION_TTL_S = 24 * 3600
REQUEST_TIMEOUT_S = 10

USDC = 10**6  # base units of one (test) USDC
ETHER = 10**18
# What a run tops the wallet up to, and below what it does so.
WALLET_ETH_WEI = 10 * ETHER
WALLET_ETH_MIN_WEI = 1 * ETHER
WALLET_USDC_UNITS = 100 * USDC
SMART_ACCOUNT_USDC_UNITS = 100 * USDC
# The session key's policy: what Tollgate's settlement may pull per period, for how long.
SMART_ACCOUNT_SALT = 0
SESSION_CAP_PER_PERIOD_UNITS = 50 * USDC
# The dev voucher: Tollgate may collect up to this much in all under the session key
# (the key's policy still caps each day); valid for as long as the key.
VOUCHER_CUMULATIVE_UNITS = 1000 * USDC
VOUCHER_LIFETIME_S = 29 * 86_400
SESSION_PERIOD_S = 24 * 3600
SESSION_KEY_VALIDITY_S = 30 * 24 * 3600
# A key that expires within a session's lifetime is granted again, so no token outlives it.
SESSION_KEY_MIN_REMAINING_S = SESSION_TTL_S


@dataclass(frozen=True)
class SessionKeyPolicy:
    """A session key's policy as read on chain (amounts in token base units)."""

    token: str
    payee: str
    cap_per_period: int
    period_seconds: int
    valid_until: int
    live: bool


@dataclass(frozen=True)
class DevChainWallet:
    """What the wallet holds on the dev chain after a run."""

    rpc_url: str
    deployment: Deployment
    smart_account: str
    wallet_eth_wei: int
    wallet_usdc_units: int
    smart_account_usdc_units: int
    session_policy: SessionKeyPolicy
    transactions_sent: int  # by this run: 0 when everything was already in place

    def to_json(self) -> dict[str, object]:
        policy = self.session_policy
        return {
            "chain_id": self.deployment.chain_id,
            "rpc_url": self.rpc_url,
            "usdc": self.deployment.token,
            "settlement": self.deployment.settlement,
            "account_factory": self.deployment.factory,
            "balances": {
                "wallet_eth_wei": self.wallet_eth_wei,
                "wallet_usdc_units": self.wallet_usdc_units,
                "smart_account_usdc_units": self.smart_account_usdc_units,
            },
            "session_policy": {
                "token": policy.token, "payee": policy.payee,
                "cap_per_period_units": policy.cap_per_period,
                "period_seconds": policy.period_seconds, "valid_until": policy.valid_until,
                "live": policy.live,
            },
            "transactions_sent": self.transactions_sent,
        }


@dataclass(frozen=True)
class DevSession:
    wallet: LocalAccount  # the EOA: signs for itself, or owns the smart account
    session_key: LocalAccount
    chain_id: int
    token: str
    expires_at: int
    account_id: str
    chain: DevChainWallet | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "wallet": {"address": self.wallet.address, "private_key": _hex(self.wallet.key)},
            "session_key": {"address": self.session_key.address,
                            "private_key": _hex(self.session_key.key)},
            "smart_account": self.chain.smart_account if self.chain else None,
            "chain_id": self.chain_id,
            "account": self.account_id,
            "token": self.token,
            "expires_at": self.expires_at,
            "dev_chain": self.chain.to_json() if self.chain else None,
        }


# -- keys ------------------------------------------------------------------------


def _load_or_create_key(path: Path, note: str) -> LocalAccount:
    """A key kept at `path`, created once (0600) so every run signs as the same account."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        key = "0x" + secrets.token_hex(32)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # Another run created it first; read theirs.
        else:
            with os.fdopen(descriptor, "w") as handle:
                json.dump({"private_key": key, "note": note}, handle)
    return Account.from_key(json.loads(path.read_text())["private_key"])


def load_or_create_wallet(state_dir: Path) -> LocalAccount:
    """The state dir's dev wallet (the EOA)."""
    return _load_or_create_key(state_dir / WALLET_FILE, "development only")


def load_or_create_session_key(state_dir: Path) -> LocalAccount:
    """The state dir's session key on the dev chain (kept: it is granted on chain)."""
    return _load_or_create_key(state_dir / SESSION_KEY_FILE,
                               "development only: the agent's session key on the dev chain")


# -- the whole run -----------------------------------------------------------------


async def run_dev_wallet(base_url: str, state_dir: Path) -> DevSession:
    """Set up the state dir's dev wallet (on its dev chain, if serve runs one) and sign in."""
    wallet = await asyncio.to_thread(load_or_create_wallet, state_dir)
    location = await asyncio.to_thread(find_dev_chain, state_dir)
    if location is None:
        return await create_session(base_url, wallet)
    session_key = await asyncio.to_thread(load_or_create_session_key, state_dir)
    chain = await provision_dev_chain_wallet(location, wallet, session_key)
    chain_id, token, expires_at, account_id = await authorize(
        base_url, session_key, smart_account=chain.smart_account,
        session_key=session_key.address, chain_id=location.deployment.chain_id,
    )
    await give_voucher(base_url, token, session_key, chain.smart_account, location)
    return DevSession(wallet, session_key, chain_id, token, expires_at, account_id, chain)


async def give_voucher(base_url: str, token: str, session_key: LocalAccount,
                       smart_account: str, location: DevChainLocation) -> None:
    """Let Tollgate collect the account's debt: the session key signs a cumulative voucher
    (the policy still caps each day, the balance caps the rest) and posts it."""
    deployment = location.deployment
    domain = VoucherDomain(deployment.chain_id, deployment.settlement, deployment.token)
    deadline_s = int(time.time()) + VOUCHER_LIFETIME_S
    digest = domain.digest(smart_account, VOUCHER_CUMULATIVE_UNITS, deadline_s)
    signature = session_key.unsafe_sign_hash(Hash32(digest)).signature
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http, \
            http.post(f"{base_url}/v1/vouchers", json={
                "cumulativeAmount": str(VOUCHER_CUMULATIVE_UNITS), "deadline": deadline_s,
                "signature": "0x" + bytes(signature).hex()}) as response:
        if response.status >= 400:
            body = await response.json(content_type=None)
            # A higher voucher from an earlier run is already stored: nothing to give.
            if body.get("error", {}).get("code") != "voucher_not_increasing":
                raise RuntimeError(f"POST /v1/vouchers failed ({response.status}): {body}")


async def create_session(base_url: str, wallet: LocalAccount) -> DevSession:
    """Sign an Authorization as ``wallet`` (its own smart account) with a fresh session key."""
    session_key = Account.create()
    chain_id, token, expires_at, account_id = await authorize(
        base_url, wallet, smart_account=wallet.address, session_key=session_key.address)
    return DevSession(wallet, session_key, chain_id, token, expires_at, account_id)


async def authorize(base_url: str, signer: LocalAccount, *, smart_account: str,
                    session_key: str, chain_id: int | None = None) -> tuple[int, str, int, str]:
    """Sign an Authorization as ``signer`` from the server's schema and post it.

    Returns (chain id, token, expiresAt, account id). ``chain_id`` None takes the
    server's first domain."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{base_url}/v1/authorize/schema") as response:
            response.raise_for_status()
            schema = await response.json()
        domain = _domain(schema, chain_id)
        now_s = int(time.time())
        message = {
            "wallet": signer.address,
            "smartAccount": smart_account,
            "sessionKey": session_key,
            "chainId": domain["chainId"],
            "nonce": secrets.token_hex(16),
            "issuedAt": now_s,
            "expiresAt": now_s + min(SESSION_TTL_S, schema["limits"]["session_ttl_max_s"]),
        }
        signed = signer.sign_typed_data(
            full_message={"types": schema["types"], "primaryType": schema["primaryType"],
                          "domain": domain, "message": message}
        )
        async with http.post(
            f"{base_url}/v1/authorize", json=message,
            headers={schema["signature"]["header"]: "0x" + signed.signature.hex()},
        ) as response:
            body = await response.json()
            if response.status != 201:
                raise RuntimeError(f"authorize failed ({response.status}): {body}")
    return int(domain["chainId"]), body["token"], int(body["expiresAt"]), body["account"]["id"]


def _domain(schema: dict[str, Any], chain_id: int | None) -> dict[str, Any]:
    domains: list[dict[str, Any]] = schema["domains"]
    if chain_id is None:
        return domains[0]
    for domain in domains:
        if int(domain["chainId"]) == chain_id:
            return domain
    raise RuntimeError(f"the server does not accept chain {chain_id} (its TOLLGATE_CHAIN_IDS:"
                       f" {[d['chainId'] for d in domains]})")


# -- the dev chain -------------------------------------------------------------------


async def provision_dev_chain_wallet(location: DevChainLocation, wallet: LocalAccount,
                                     session_key: LocalAccount) -> DevChainWallet:
    """Fund ``wallet``, create its smart account and grant ``session_key``, as needed."""
    deployment = location.deployment
    # Dev keys are printed in the clear: they must never hold anything on a real chain.
    if deployment.chain_id != DEV_CHAIN_ID:
        raise RuntimeError(f"refusing to fund dev keys on chain {deployment.chain_id}")
    client = await ChainClient.connect(location.rpc_url, deployment.chain_id,
                                       poll_interval_s=DEV_POLL_INTERVAL_S)
    try:
        return await _Provisioner(client, location, wallet, session_key).run()
    finally:
        await client.close()


class _Provisioner:
    """One run's chain work: the operator funds and creates, then the owner grants."""

    def __init__(self, client: ChainClient, location: DevChainLocation, wallet: LocalAccount,
                 session_key: LocalAccount) -> None:
        self.client = client
        self.location = location
        self.deployment = location.deployment
        self.wallet = wallet
        self.session_key = session_key
        self.operator = OperatorWallet(client, Account.from_key(DEV_OPERATOR_KEY))
        if self.operator.address != self.deployment.operator:
            raise RuntimeError("the dev chain's contracts were not deployed by the dev operator")
        self.usdc = bind_contract(client.w3, "TestUSDC", self.deployment.token)
        self.factory = bind_contract(client.w3, "TollgateAccountFactory", self.deployment.factory)
        self.sent = 0

    async def run(self) -> DevChainWallet:
        smart_account = str(await self.client.read(
            self.factory.functions.getAddress(self.wallet.address, SMART_ACCOUNT_SALT)))
        # The operator's transactions do not depend on one another (the account's address is
        # known before it exists), so they are sent back to back and awaited together.
        pending = [
            *await self._top_up_eth(),
            *await self._top_up_usdc(self.wallet.address, WALLET_USDC_UNITS),
            *await self._create_account(smart_account),
            *await self._top_up_usdc(smart_account, SMART_ACCOUNT_USDC_UNITS),
        ]
        await self._confirm(pending)
        # The grant is the owner's own transaction: it needs the ETH and the account above.
        await self._confirm(await self._grant_session_key(smart_account))
        policy = await self._policy(smart_account)
        assert policy.live, "a session key granted just now must be live"
        return DevChainWallet(
            rpc_url=self.location.rpc_url,
            deployment=self.deployment,
            smart_account=smart_account,
            wallet_eth_wei=await self._eth_balance(self.wallet.address),
            wallet_usdc_units=await self._usdc_balance(self.wallet.address),
            smart_account_usdc_units=await self._usdc_balance(smart_account),
            session_policy=policy,
            transactions_sent=self.sent,
        )

    async def _confirm(self, tx_hashes: list[HexBytes]) -> None:
        for tx_hash in tx_hashes:
            await self.client.wait_for_receipt(tx_hash)
        self.sent += len(tx_hashes)

    async def _eth_balance(self, address: str) -> int:
        balance = self.client.w3.eth.get_balance(to_checksum_address(address))
        return int(await self.client.rpc(balance))

    async def _usdc_balance(self, address: str) -> int:
        return int(await self.client.read(self.usdc.functions.balanceOf(address)))

    async def _top_up_eth(self) -> list[HexBytes]:
        balance = await self._eth_balance(self.wallet.address)
        if balance >= WALLET_ETH_MIN_WEI:
            return []
        return [await self.operator.send(to=self.wallet.address, value=WALLET_ETH_WEI - balance)]

    async def _top_up_usdc(self, address: str, target_units: int) -> list[HexBytes]:
        balance = await self._usdc_balance(address)
        if balance >= target_units:
            return []
        # TestUSDC's owner is the operator, so minting is the faucet.
        mint = self.usdc.functions.mint(address, target_units - balance)
        return [await self.operator.transact(mint)]

    async def _create_account(self, smart_account: str) -> list[HexBytes]:
        if await self.client.code_at(smart_account):
            return []
        create = self.factory.functions.createAccount(self.wallet.address, SMART_ACCOUNT_SALT)
        return [await self.operator.transact(create)]

    async def _policy(self, smart_account: str) -> SessionKeyPolicy:
        account = bind_contract(self.client.w3, "TollgateAccount", smart_account)
        raw, live = await self.client.read(
            account.functions.sessionPolicy(self.session_key.address))
        token, payee, cap, period, valid_until = raw
        return SessionKeyPolicy(token=str(token), payee=str(payee), cap_per_period=int(cap),
                                period_seconds=int(period), valid_until=int(valid_until),
                                live=bool(live))

    async def _grant_session_key(self, smart_account: str) -> list[HexBytes]:
        """Grant the key unless it is live for Tollgate, in USDC, for long enough."""
        policy = await self._policy(smart_account)
        block = await self.client.rpc(self.client.w3.eth.get_block("latest"))
        now_s = int(block["timestamp"])  # the chain's clock decides whether a key is live
        if (policy.live and policy.token == self.deployment.token
                and policy.payee == self.deployment.settlement
                and policy.valid_until - now_s >= SESSION_KEY_MIN_REMAINING_S):
            return []
        account = bind_contract(self.client.w3, "TollgateAccount", smart_account)
        grant = account.functions.grantSessionKey(self.session_key.address, (
            self.deployment.token, self.deployment.settlement, SESSION_CAP_PER_PERIOD_UNITS,
            SESSION_PERIOD_S, now_s + SESSION_KEY_VALIDITY_S,
        ))
        return [await OperatorWallet(self.client, self.wallet).transact(grant)]


# -- output ----------------------------------------------------------------------------


def _usdc(units: int) -> str:
    return f"{units // USDC}.{units % USDC:06d} USDC"


def _hex(key: bytes) -> str:
    return "0x" + bytes(key).hex()


def _utc(timestamp_s: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp_s))


def describe(session: DevSession, base_url: str) -> str:
    lines = _describe_chain(session) if session.chain else [
        f"dev wallet {session.wallet.address} (account {session.account_id}, "
        f"chain {session.chain_id})",
        f"session key {session.session_key.address} (private key kept by you, not the server)",
    ]
    return "\n".join([
        *lines,
        f"token (account {session.account_id}, valid until {_utc(session.expires_at)}):",
        f"  export TOLLGATE_TOKEN={session.token}",
        "",
        f"  curl -s {base_url}/v1/chat/completions -H \"Authorization: Bearer $TOLLGATE_TOKEN\""
        " -H 'Content-Type: application/json' \\",
        "    -d '{\"model\": \"mock-gpt\", \"messages\": [{\"role\": \"user\", "
        "\"content\": \"Hello\"}]}'",
        "",
        "  import os; from openai import OpenAI",
        f"  client = OpenAI(base_url=\"{base_url}/v1\", api_key=os.environ[\"TOLLGATE_TOKEN\"])",
    ])


def _describe_chain(session: DevSession) -> list[str]:
    chain = session.chain
    assert chain is not None
    policy = chain.session_policy
    sent = (f"{chain.transactions_sent} transaction(s) sent" if chain.transactions_sent
            else "everything was already in place")
    return [
        f"dev wallet on dev chain {chain.deployment.chain_id} at {chain.rpc_url} ({sent})",
        "These keys exist only on this dev chain: never send anything to them elsewhere.",
        f"  EOA (owner)    {session.wallet.address}",
        f"    private key  {_hex(session.wallet.key)}",
        f"    holds        {chain.wallet_eth_wei / ETHER:g} ETH,"
        f" {_usdc(chain.wallet_usdc_units)} (for x402 payments)",
        f"  smart account  {chain.smart_account} holds {_usdc(chain.smart_account_usdc_units)}",
        f"  session key    {session.session_key.address} (for the agent)",
        f"    private key  {_hex(session.session_key.key)}",
        f"    policy       settlement {policy.payee} may pull up to"
        f" {_usdc(policy.cap_per_period)} per {policy.period_seconds // 3600} h,"
        f" until {_utc(policy.valid_until)}",
        f"  TestUSDC {chain.deployment.token}",
    ]
