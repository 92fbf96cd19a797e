"""Session-wide real parts: embedded Postgres and Redis, the mock upstream process, Tollgate.

Each is started once per test session (starting them per test would dominate
the run time) and stopped at the end. Tests get fresh state where they need it
through their own ids, never by restarting servers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount

from app.chain.client import ChainClient
from app.chain.config import ChainConfig
from app.chain.deploy import Deployment, deploy_tollgate
from app.chain.operator import OperatorWallet
from app.config.catalog import Catalog, build_catalog
from app.config.settings import Settings, load_settings
from app.devstack.anvil import DEV_CHAIN_ID, Anvil
from app.devstack.postgres import EmbeddedPostgres
from app.devstack.redis import EmbeddedRedis
from app.http.app import Backends, create_app
from app.serve import app_runner
from app.storage.database import migrate_in_thread
from tests.identity.wallets import authorize, bearer

REPO = Path(__file__).resolve().parent.parent
# A provider key that must never appear in any response or log line.
SECRET_PROVIDER_KEY = "sk-test-SECRETKEYSHOULDNEVERLEAK"
PROCESS_START_TIMEOUT_S = 30
# Every test app signs session tokens with this key, so a token from one works on all.
TEST_JWT_SECRET = "5e55104e" * 8


# Every test closes the OpenAI clients it makes. One left to the garbage collector is
# worse than a leak: openai's __del__ schedules its aclose() as a task, but the same
# collection has already closed its sockets (an asyncio transport closes its own in
# __del__). When that task runs, it unregisters from the event loop whatever socket has
# reused those fd numbers in between, typically a Redis connection of a burst: its reply
# sits in the kernel unread until its socket timeout.
_openai_clients: weakref.WeakSet[openai.AsyncOpenAI] = weakref.WeakSet()
_openai_client_init = openai.AsyncOpenAI.__init__


def _tracked_openai_client_init(self: openai.AsyncOpenAI, *args: Any, **kwargs: Any) -> None:
    _openai_client_init(self, *args, **kwargs)
    _openai_clients.add(self)


openai.AsyncOpenAI.__init__ = _tracked_openai_client_init  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def openai_clients_closed() -> Iterator[None]:
    _openai_clients.clear()
    yield
    left_open = [client for client in _openai_clients if not client.is_closed()]
    _openai_clients.clear()
    assert not left_open, f"{len(left_open)} OpenAI client(s) left open: close them in the test"


@pytest.fixture(scope="session")
def state_root() -> Iterator[Path]:
    # Short path: Unix socket paths are limited to ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="tg-", dir="/tmp"))
    yield root


@pytest.fixture(scope="session")
async def postgres_url(state_root: Path) -> AsyncIterator[str]:
    server = EmbeddedPostgres(state_root / "postgres")
    url = await asyncio.to_thread(server.start)
    await server.ensure_database()
    await migrate_in_thread(url)
    yield url
    await asyncio.to_thread(server.stop)


@pytest.fixture(scope="session")
async def redis_url(state_root: Path) -> AsyncIterator[str]:
    server = EmbeddedRedis(state_root / "redis")
    url = await asyncio.to_thread(server.start)
    yield url
    await asyncio.to_thread(server.stop)


# anvil's first public test account: worthless anywhere but on a dev chain.
ANVIL_OPERATOR_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


@dataclass
class DevChain:
    """One anvil for the test session, with Tollgate's contracts deployed."""

    url: str
    deployment: Deployment
    operator: LocalAccount
    client: ChainClient  # bound to the session loop
    # The one wallet that sends the operator's transactions in tests (one nonce sequence).
    wallet: OperatorWallet

    def config(self, **overrides: Any) -> ChainConfig:
        values: dict[str, Any] = {
            "rpc_url": self.url, "chain_id": self.deployment.chain_id,
            "token": self.deployment.token, "settlement": self.deployment.settlement,
            "account_factories": (self.deployment.factory,),
            "operator_private_key": self.operator.key.to_0x_hex(), "confirmations": 1,
        }
        values.update(overrides)
        return ChainConfig(**values)


@pytest.fixture(scope="session")
async def dev_chain() -> AsyncIterator[DevChain]:
    anvil = Anvil(None)
    url = await asyncio.to_thread(anvil.start)
    client = await ChainClient.connect(url, DEV_CHAIN_ID, poll_interval_s=0.01)
    operator = Account.from_key(ANVIL_OPERATOR_KEY)
    wallet = OperatorWallet(client, operator)
    deployment = await deploy_tollgate(client, wallet, treasury=Account.create().address)
    yield DevChain(url, deployment, operator, client, wallet)
    await client.close()
    await asyncio.to_thread(anvil.stop)


def start_process(args: list[str], ready_marker: str, env: dict[str, str] | None = None
                  ) -> tuple[subprocess.Popen[str], str]:
    """Start a child process and return it with its first stdout line containing the marker.

    Its output is drained for as long as it runs: a child that logs into a pipe nobody
    reads blocks once the pipe's 64 KiB fill up, and then stalls every request it serves.
    What it writes to stderr goes to a file, shown if it exits before it is ready.
    """
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the child)
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, **(env or {})}, cwd=REPO,
    )
    assert process.stdout is not None
    while True:
        line = process.stdout.readline()
        if not line:
            log.seek(0)
            raise RuntimeError(f"{args} exited before it was ready: {log.read()[-3000:]}")
        if ready_marker in line:
            threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
            return process, line.strip()


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


@dataclass(frozen=True)
class MockUpstream:
    """The mock provider process: ``root`` is http://host:port, ``v1`` its API base."""

    root: str

    @property
    def v1(self) -> str:
        return f"{self.root}/v1"

    def scenario(self, options: str) -> str:
        return f"{self.root}/s/{options}/v1"


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockUpstream]:
    process, line = start_process(
        [sys.executable, "-m", "app", "mock-upstream", "--port", "0"], "listening on"
    )
    url = line.rsplit(" ", 1)[-1]
    yield MockUpstream(url.removesuffix("/v1"))
    process.terminate()
    process.wait(10)


def test_catalog_document(mock: MockUpstream) -> dict[str, Any]:
    """Providers for every fault the mock can play, and models that route through them."""
    refused = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there
    providers = {
        "mock": {"base_url": mock.v1, "api_key_env": "TEST_MOCK_KEY"},
        "mock-b": {"base_url": mock.v1},
        "down": {"base_url": mock.scenario("fault=status,status=503")},
        "limited": {"base_url": mock.scenario("fault=status,status=429")},
        "dropper": {"base_url": mock.scenario("fault=drop")},
        "refused": {"base_url": refused, "connect_timeout_s": 2},
        "slow": {"base_url": mock.scenario("latency_ms=3000"), "first_byte_timeout_s": 0.3},
        "stalls": {"base_url": mock.scenario("chunk_delay_ms=3000"), "idle_timeout_s": 0.3},
        "rejects": {"base_url": mock.scenario("fault=status,status=400")},
        "badkey": {"base_url": mock.scenario("fault=status,status=401")},
        "cutter": {"base_url": mock.scenario("fault=cut,cut_after=2")},
        "nousage": {"base_url": mock.scenario("fault=no_usage")},
        "unset": {"base_url": mock.v1, "api_key_env": "TEST_UNSET_KEY"},
    }
    price = {"input": "1.00", "output": "2.00", "cached_input": "0.50"}

    def model(model_id: str, *providers: str, max_output: int = 4096) -> dict[str, Any]:
        return {
            "id": model_id, "context_length": 32768, "max_output_tokens": max_output,
            "price": price,
            "routes": [{"provider": p, "model": "mock-gpt"} for p in providers],
        }

    return {
        "providers": providers,
        "models": [
            model("test-model", "mock", "mock-b"),
            model("fallback-model", "down", "limited", "dropper", "refused", "mock-b"),
            model("down-model", "down"),
            model("limited-model", "limited"),
            model("timeout-model", "slow"),
            model("timeout-fallback-model", "slow", "mock"),
            model("stall-model", "stalls"),
            model("rejects-model", "rejects", "mock"),
            model("badkey-model", "badkey"),
            model("cut-model", "cutter", "mock"),
            model("nousage-model", "nousage"),
            model("small-model", "mock", max_output=100),
            model("unset-model", "unset"),
        ],
    }


@pytest.fixture(scope="session")
def catalog(mock_upstream: MockUpstream) -> Catalog:
    environ = {"TEST_MOCK_KEY": SECRET_PROVIDER_KEY}
    return build_catalog(test_catalog_document(mock_upstream), environ, source="tests")


@pytest.fixture(scope="session")
def backends(postgres_url: str, redis_url: str) -> Backends:
    return Backends(postgres_url, redis_url)


def make_settings(**overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "max_body_bytes": 256 * 1024, "max_messages": 64, "jwt_secret": TEST_JWT_SECRET,
        # Every test client is 127.0.0.1 and each session starts with POST /v1/authorize,
        # which is limited per IP; tests of that limit set their own low value.
        "rate_limit_ip_requests_per_min": 1_000_000,
    }
    defaults.update(overrides)
    return load_settings(**defaults)


@dataclass
class RunningTollgate:
    """A Tollgate app served on a loopback port in the test loop."""

    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


async def start_tollgate(
    settings: Settings, catalog: Catalog, backends: Backends
) -> RunningTollgate:
    app = create_app(settings, catalog, backends)
    runner = app_runner(app, settings)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return RunningTollgate(f"http://127.0.0.1:{port}", app, runner)


@pytest.fixture(scope="session")
async def tollgate(catalog: Catalog, backends: Backends) -> AsyncIterator[RunningTollgate]:
    running = await start_tollgate(make_settings(), catalog, backends)
    yield running
    await running.runner.cleanup()


@pytest.fixture(scope="session")
async def session_token(tollgate: RunningTollgate) -> str:
    """One wallet's session on the ``tollgate`` app, shared by the tests that just need a caller."""
    async with aiohttp.ClientSession() as anonymous:
        issued = await authorize(anonymous, tollgate.url)
    return str(issued["token"])


@pytest.fixture(scope="session")
def auth_headers(session_token: str) -> dict[str, str]:
    return bearer(session_token)


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client without credentials (tests/proxy overrides it with ``authed_http``)."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="session")
async def authed_http(auth_headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that sends the shared session token with every request.

    Never revoke that session through it (DELETE /v1/authorize): every test shares it.
    """
    async with aiohttp.ClientSession(headers=auth_headers) as session:
        yield session
