"""A state dir with its own dev chain (as ``tollgate serve`` leaves it), and a Tollgate
billing on that chain, for the dev-wallet tests."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.chain.client import ChainClient
from app.config.catalog import Catalog
from app.devstack.dev_chain import DevChain, ensure_dev_chain
from app.http.app import Backends
from tests.conftest import RunningTollgate, make_settings, start_tollgate

POLL_INTERVAL_S = 0.01


@dataclass
class ChainState:
    """A state dir whose dev chain is running, and a client on that chain."""

    state_dir: Path
    chain: DevChain
    client: ChainClient


@pytest.fixture(scope="session")
async def chain_state() -> AsyncIterator[ChainState]:
    state_dir = Path(tempfile.mkdtemp(prefix="tgw-", dir="/tmp"))
    chain = await ensure_dev_chain(state_dir)
    client = await ChainClient.connect(chain.rpc_url, chain.deployment.chain_id,
                                       poll_interval_s=POLL_INTERVAL_S)
    yield ChainState(state_dir, chain, client)
    await client.close()
    await asyncio.to_thread(chain.stop)


@pytest.fixture(scope="session")
async def chain_tollgate(
    chain_state: ChainState, postgres_url: str, redis_url: str, catalog: Catalog
) -> AsyncIterator[RunningTollgate]:
    """Tollgate with ``Backends.chain`` set to the state dir's dev chain, as serve runs it."""
    backends = Backends(postgres_url, redis_url, chain=chain_state.chain.config)
    running = await start_tollgate(make_settings(), catalog, backends)
    yield running
    await running.runner.cleanup()
