"""Smart accounts on the test session's anvil, and a JSON-RPC relay a test can count or cut.

Accounts get fresh owners (funded with ``anvil_setBalance``, so no operator nonce is
spent on them); the operator wallet only deploys them. Each owner sends its own
grants and revocations. Signatures reuse the contract tests' helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.contract.async_contract import AsyncContractFunction

from app.chain.contracts import bind_contract
from app.chain.operator import OperatorWallet
from tests.chain.test_signatures import wrap_6492
from tests.conftest import DevChain
from tests.contracts.conftest import Chain, load_artifact, sign_1271

POLICY_CAP = 10**9  # 1000 test USDC per period
POLICY_PERIOD_S = 86_400
OWNER_BALANCE_WEI = 10**18


@dataclass(frozen=True)
class _ChainId:
    """``sign_1271`` reads only ``chain_id`` from its ``Chain``."""

    chain_id: int


def sign_as_account(owner: LocalAccount, account: str, chain_id: int, hash_: bytes) -> str:
    """The account's ERC-1271 signature of ``hash_``: its owner's, in the account's domain."""
    return "0x" + sign_1271(cast(Chain, _ChainId(chain_id)), owner, account, hash_).hex()


def sign_undeployed(owner: LocalAccount, factory: str, salt: int, account: str, chain_id: int,
                    hash_: bytes) -> str:
    """The ERC-6492 signature of the account ``factory`` would deploy for (owner, salt)."""
    inner = sign_1271(cast(Chain, _ChainId(chain_id)), owner, account, hash_)
    return "0x" + wrap_6492(_factory(factory), owner, salt, inner).hex()


def _factory(address: str) -> Contract:
    # Only used to encode createAccount calldata: no provider needed.
    return Web3().eth.contract(address=Web3.to_checksum_address(address),
                               abi=load_artifact("TollgateAccountFactory")["abi"])


@dataclass
class SmartAccounts:
    """Deploys TollgateAccounts and manages their session keys on the dev chain."""

    chain: DevChain
    _senders: dict[str, OperatorWallet] = field(default_factory=dict)

    @property
    def chain_id(self) -> int:
        return self.chain.deployment.chain_id

    async def new_owner(self) -> LocalAccount:
        owner: LocalAccount = Account.create()
        await self.anvil("anvil_setBalance", [owner.address, hex(OWNER_BALANCE_WEI)])
        return owner

    async def address_of(self, owner: LocalAccount, salt: int = 0,
                         factory: str | None = None) -> str:
        """The counterfactual address of (owner, salt) from ``factory`` (Tollgate's)."""
        contract = bind_contract(self.chain.client.w3, "TollgateAccountFactory",
                                 factory or self.chain.deployment.factory)
        return str(await self.chain.client.read(
            contract.functions.getAddress(owner.address, salt)))

    async def deploy(self, owner: LocalAccount, salt: int = 0) -> str:
        factory = bind_contract(self.chain.client.w3, "TollgateAccountFactory",
                                self.chain.deployment.factory)
        tx_hash = await self.chain.wallet.transact(
            factory.functions.createAccount(owner.address, salt))
        await self.chain.client.wait_for_receipt(tx_hash)
        return await self.address_of(owner, salt)

    async def grant(self, owner: LocalAccount, account: str, key: str, *,
                    payee: str | None = None, ttl_s: int = POLICY_PERIOD_S) -> int:
        """Grant ``key`` a policy paying ``payee`` (the settlement contract); its validUntil."""
        valid_until_s = await self.chain_now() + ttl_s
        policy = (self.chain.deployment.token, payee or self.chain.deployment.settlement,
                  POLICY_CAP, POLICY_PERIOD_S, valid_until_s)
        await self._send(owner, self._account(account).functions.grantSessionKey(key, policy))
        return valid_until_s

    async def revoke(self, owner: LocalAccount, account: str, key: str) -> None:
        await self._send(owner, self._account(account).functions.revokeSessionKey(key))

    async def chain_now(self) -> int:
        """The chain's time now: a fresh block, since the latest may be minutes old."""
        await self.anvil("evm_mine", [])
        block = await self.chain.client.rpc(self.chain.client.w3.eth.get_block("latest"))
        return int(block["timestamp"])

    async def advance(self, seconds: int) -> None:
        """Move the chain's clock (anvil's time control, no sleeping) and mine a block."""
        await self.anvil("evm_increaseTime", [seconds])
        await self.anvil("evm_mine", [])

    async def anvil(self, method: str, params: list[Any]) -> Any:
        response = await self.chain.client.w3.provider.make_request(method, params)  # type: ignore[arg-type]
        assert "error" not in response, response
        return response.get("result")

    def _account(self, address: str) -> Any:
        return bind_contract(self.chain.client.w3, "TollgateAccount", address)

    async def _send(self, owner: LocalAccount, function: AsyncContractFunction) -> None:
        sender = self._senders.setdefault(owner.address,
                                          OperatorWallet(self.chain.client, owner))
        await self.chain.client.wait_for_receipt(await sender.transact(function))


class RpcProxy:
    """A JSON-RPC relay to the dev chain: counts what passes, and can go down for good."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.methods: list[str] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        self._http = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post("/", self._relay)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Close the port: from now on every connection is refused."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _relay(self, request: web.Request) -> web.Response:
        assert self._http is not None
        body = await request.read()
        call = await request.json()
        self.methods += [c["method"] for c in call] if isinstance(call, list) else [call["method"]]
        async with self._http.post(self.upstream, data=body,
                                   headers={"Content-Type": "application/json"}) as answer:
            return web.Response(body=await answer.read(), status=answer.status,
                                content_type="application/json")
