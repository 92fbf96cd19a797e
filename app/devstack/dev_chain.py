"""The dev chain ``tollgate serve`` bills on when no chain is configured.

With no RPC URL, anvil is started with its state in ``<state dir>/chain``; with one (an
external dev node such as docker-compose's anvil), that node is used as it is. Either
way Tollgate's contracts are deployed once per state dir: ``chain/deployment.json``
remembers the addresses, and a second start reuses them as long as they still have
code (a lost chain state means a fresh deployment). While the chain is in use,
``chain/rpc-url`` says where it answers, so ``tollgate dev-wallet`` can find it.

The operator is anvil's first public test account: its key is printed in every anvil
tutorial, which is fine here because nothing it holds is worth anything off this chain.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account

from app.chain.client import ChainClient
from app.chain.config import ChainConfig
from app.chain.contracts import bind_contract
from app.chain.deploy import Deployment, deploy_tollgate
from app.chain.errors import TransactionReverted
from app.chain.operator import OperatorWallet
from app.devstack.anvil import DEV_CHAIN_ID, Anvil

CHAIN_DIR = "chain"
DEPLOYMENT_FILE = "deployment.json"
RPC_URL_FILE = "rpc-url"
# anvil's public test accounts #0 (operator, token owner) and #1 (treasury).
DEV_OPERATOR_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
DEV_TREASURY = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
# anvil mines each transaction at once: short receipt polls keep deployment and funding fast.
DEV_POLL_INTERVAL_S = 0.02


@dataclass(frozen=True)
class DevChainLocation:
    """Where a running dev chain answers and what is deployed on it (read from a state dir)."""

    rpc_url: str
    deployment: Deployment


class DevChain:
    """A dev chain in use by this process: its config, and how to let go of it."""

    def __init__(self, *, chain_dir: Path, rpc_url: str, deployment: Deployment,
                 deployed_now: bool, anvil: Anvil | None) -> None:
        self.chain_dir = chain_dir
        self.rpc_url = rpc_url
        self.deployment = deployment
        self.deployed_now = deployed_now
        self._anvil = anvil

    @property
    def config(self) -> ChainConfig:
        return ChainConfig(
            rpc_url=self.rpc_url,
            chain_id=self.deployment.chain_id,
            token=self.deployment.token,
            settlement=self.deployment.settlement,
            account_factories=(self.deployment.factory,),
            operator_private_key=DEV_OPERATOR_KEY,
            confirmations=1,
        )

    @property
    def started_anvil(self) -> bool:
        return self._anvil is not None

    def describe(self) -> str:
        """Two banner lines: where the chain is, and what is deployed on it."""
        where = (f"anvil at {self.rpc_url}, state in {self.chain_dir}" if self._anvil
                 else f"the node at {self.rpc_url} (TOLLGATE_DEV_CHAIN_RPC_URL)")
        what = "deployed now" if self.deployed_now else "reused"
        return (f"dev chain {self.deployment.chain_id}: {where}\n"
                f"    contracts ({what}): TestUSDC {self.deployment.token},"
                f" settlement {self.deployment.settlement},"
                f" account factory {self.deployment.factory}")

    def stop(self) -> None:
        """Forget the RPC URL (no dev-wallet may find a chain that is gone), then stop anvil
        if this process started it; an external node keeps running."""
        (self.chain_dir / RPC_URL_FILE).unlink(missing_ok=True)
        if self._anvil is not None:
            self._anvil.stop()


async def ensure_dev_chain(state_dir: Path, *, rpc_url: str | None = None) -> DevChain:
    """Start anvil (unless `rpc_url` names a dev node), deploy Tollgate's contracts unless
    this state dir's deployment is still there, and record where the chain answers.

    Raises ``AnvilNotInstalled`` when anvil is needed but missing, and a ``ChainError`` when
    the node cannot be reached or serves another chain than 31337."""
    chain_dir = await asyncio.to_thread(_chain_dir, state_dir)
    anvil = Anvil(chain_dir) if rpc_url is None else None
    if anvil is not None:
        rpc_url = await asyncio.to_thread(anvil.start)
    assert rpc_url is not None
    try:
        client = await ChainClient.connect(rpc_url, DEV_CHAIN_ID,
                                           poll_interval_s=DEV_POLL_INTERVAL_S)
        try:
            deployment, deployed_now = await _deployment(client, chain_dir)
        finally:
            await client.close()
        await asyncio.to_thread(write_atomically, chain_dir / RPC_URL_FILE, rpc_url + "\n")
    except BaseException:
        if anvil is not None:
            await asyncio.to_thread(anvil.stop)
        raise
    return DevChain(chain_dir=chain_dir, rpc_url=rpc_url, deployment=deployment,
                    deployed_now=deployed_now, anvil=anvil)


async def _deployment(client: ChainClient, chain_dir: Path) -> tuple[Deployment, bool]:
    """The state dir's deployment if it is still on the chain, else a fresh one (True)."""
    path = chain_dir / DEPLOYMENT_FILE
    known = await asyncio.to_thread(_read_deployment, path)
    if known is not None and await _is_deployed(client, known):
        return known, False
    operator = OperatorWallet(client, Account.from_key(DEV_OPERATOR_KEY))
    deployment = await deploy_tollgate(client, operator, treasury=DEV_TREASURY)
    text = json.dumps(deployment.to_json(), indent=2) + "\n"
    await asyncio.to_thread(write_atomically, path, text)
    return deployment, True


def _chain_dir(state_dir: Path) -> Path:
    chain_dir = state_dir.resolve() / CHAIN_DIR
    chain_dir.mkdir(parents=True, exist_ok=True)
    return chain_dir


def _read_deployment(path: Path) -> Deployment | None:
    try:
        return Deployment.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        # Only this module writes the file (atomically); a damaged one is redeployed over.
        return None


async def _is_deployed(client: ChainClient, deployment: Deployment) -> bool:
    """Whether `deployment` still lives on this chain. A chain whose state was lost has no
    code at those addresses; the settlement's token confirms the set is the one we wrote."""
    if deployment.chain_id != client.chain_id:
        return False
    for address in (deployment.token, deployment.factory, deployment.settlement):
        if not await client.code_at(address):
            return False
    settlement = bind_contract(client.w3, "TollgateSettlement", deployment.settlement)
    try:
        token = await client.read(settlement.functions.token())
    except TransactionReverted:
        return False  # other code lives there now
    return bool(token == deployment.token)


def find_dev_chain(state_dir: Path) -> DevChainLocation | None:
    """The dev chain a ``tollgate serve`` of this state dir is using, if any."""
    chain_dir = state_dir.resolve() / CHAIN_DIR
    try:
        rpc_url = (chain_dir / RPC_URL_FILE).read_text().strip()
        raw = json.loads((chain_dir / DEPLOYMENT_FILE).read_text())
    except FileNotFoundError:
        return None
    return DevChainLocation(rpc_url=rpc_url, deployment=Deployment.from_json(raw))


def write_atomically(path: Path, text: str) -> None:
    """Write `text` so a reader sees the old file or the whole new one, never a torn one."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
