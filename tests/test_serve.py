"""``tollgate serve`` and ``tollgate migrate`` as a user runs them: real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import psutil
import pytest

from app.config.settings import load_settings
from app.devstack.anvil import Anvil, AnvilNotInstalled
from app.serve import Started, _start_dev_chain
from tests.conftest import start_process
from tests.identity.wallets import authorize

PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY")


def clean_env(**extra: str) -> dict[str, str]:
    """No storage URLs and no provider keys: the embedded defaults."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", *PROVIDER_KEYS)
           and not k.startswith("TOLLGATE_")}
    env.update(extra)
    return env


def serve(state_dir: Path, *args: str, env: dict[str, str] | None = None
          ) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--state-dir", str(state_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env or clean_env(),
    )
    assert process.stdout is not None
    while True:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"serve exited: {process.stderr.read() if process.stderr else ''}")
        if line.startswith("tollgate listening on "):
            return process, line.split()[-1]


def banner(process: subprocess.Popen[str]) -> str:
    """The rest of the banner after the "listening" line (already printed and flushed)."""
    assert process.stdout is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith("Ctrl-C"):
        line = process.stdout.readline()
        assert line, "serve closed stdout before the end of its banner"
        lines.append(line)
    return "".join(lines)


def stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(60)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def session_token(url: str) -> str:
    """A session for a fresh wallet on the served process (chain 31337 is the default)."""
    async with aiohttp.ClientSession() as http:
        return str((await authorize(http, url))["token"])


async def dev_wallet_token(url: str, state_dir: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "dev-wallet", "--url", url, "--state-dir", str(state_dir),
        "--token", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode().strip()


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tgs-", dir="/tmp"))
    yield path


async def test_embedded_defaults_drain_and_reuse(state_dir: Path) -> None:
    process, url = serve(state_dir, "--port", "0")
    try:
        printed = banner(process)
        assert "started: dev chain 31337: anvil at http://127.0.0.1:" in printed
        assert "contracts (deployed now): TestUSDC 0x" in printed
        assert f"dev-wallet --url {url} --state-dir {state_dir}" in printed
        assert (state_dir / "chain" / "rpc-url").exists(), "dev-wallet can find the chain"
        # As the banner says: the dev wallet's session key signs in for its smart account.
        token = await dev_wallet_token(url, state_dir)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
        completion = await client.chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content
        # A slow stream is in flight when SIGTERM arrives: it must finish, not break.
        stream = await client.chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_body={"mock": {"chunks": 10, "chunk_delay_ms": 100}},
        )
        first = await anext(aiter(stream))
        assert first.choices[0].delta.role == "assistant"
        process.send_signal(signal.SIGTERM)
        rest = [chunk async for chunk in stream]
        assert rest[-1].choices[0].finish_reason == "stop"
        await client.close()
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    postmaster = state_dir / "postgres" / "postmaster.pid"
    assert not postmaster.exists(), "embedded Postgres was stopped"
    assert not (state_dir / "redis" / "redis.pid").exists(), "embedded Redis was stopped"
    assert not (state_dir / "chain" / "anvil.pid").exists(), "anvil was stopped"
    assert not (state_dir / "chain" / "rpc-url").exists()
    assert (state_dir / "chain" / "anvil-state.json").exists(), "anvil saved its chain"

    # A second start reuses the state dir: same database, already migrated, same token key,
    # same contracts.
    process, url = serve(state_dir, "--port", "0")
    try:
        assert "contracts (reused)" in banner(process)
        async with aiohttp.ClientSession() as http, http.get(f"{url}/health/ready") as response:
            assert response.status == 200
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
        again = await client.chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "hi"}])
        assert again.choices[0].message.content, "the session survives a restart"
        await client.close()
    finally:
        assert stop(process) == 0
    stderr = process.stderr.read() if process.stderr else ""
    assert "Running upgrade" not in stderr, "migrations were already applied"


@pytest.fixture
def dev_node() -> Iterator[str]:
    """A dev node serve does not own, as docker-compose's anvil service is."""
    node = Anvil(None)
    yield node.start()
    node.stop()


async def test_workers_share_one_port(
    state_dir: Path, postgres_url: str, redis_url: str, dev_node: str
) -> None:
    port = free_port()
    env = clean_env(DATABASE_URL=postgres_url, REDIS_URL=redis_url,
                    TOLLGATE_DEV_CHAIN_RPC_URL=dev_node)
    process, url = serve(state_dir, "--port", str(port), "--workers", "2", env=env)
    try:
        printed = banner(process)
        assert f"using: dev chain 31337: the node at {dev_node}" in printed
        assert "started: dev chain" not in printed
        workers = [child for child in psutil.Process(process.pid).children()
                   if "spawn" in " ".join(child.cmdline())]
        assert len(workers) == 2
        # Both workers share the state dir's token key: a session from one works on the other.
        token = await session_token(url)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
        for _ in range(10):
            # A fresh connection each time lets the kernel spread them over the workers.
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token) as fresh:
                done = await fresh.chat.completions.create(
                    model="mock-gpt", messages=[{"role": "user", "content": "hi"}])
                assert done.choices[0].message.content
        async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
            text = await response.text()
        served = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("tollgate_requests_total{"))
        assert served == 10, "metrics aggregate over every worker"
        await client.close()
    finally:
        assert stop(process) == 0
    async with aiohttp.ClientSession() as http, http.post(dev_node, json={
        "jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": [],
    }) as response:
        assert response.status == 200, "serve leaves a dev node it did not start running"


def test_the_dev_chain_must_be_an_accepted_chain(state_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--state-dir", str(state_dir)],
        env=clean_env(TOLLGATE_CHAIN_IDS="8453"), capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "TOLLGATE_CHAIN_IDS" in result.stderr and "31337" in result.stderr
    assert not (state_dir / "postgres").exists(), "refused before anything started"


async def test_without_anvil_serve_runs_without_a_chain(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing() -> Path:
        raise AnvilNotInstalled("anvil is not installed: run `npm ci`")

    # The one way to make the installed binary look absent: its lookup.
    monkeypatch.setattr("app.devstack.anvil.anvil_binary", missing)
    started = Started()
    settings = load_settings(state_dir=state_dir)
    chain = await _start_dev_chain(settings, state_dir, started)
    assert chain is None and started.dev_chain is None and not started.stops
    assert "no chain: anvil is not installed" in caplog.text
    assert started.uses == ["no chain (anvil is not installed: run `npm ci`)"]


def test_bad_setting_stops_the_start(state_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--state-dir", str(state_dir)],
        env=clean_env(TOLLGATE_PORT="http"), capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "TOLLGATE_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_external_database_must_be_migrated_and_migrate_does_it(
    postgres_url: str, redis_url: str, state_dir: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        env=clean_env(DATABASE_URL=postgres_url), capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "migrated" in result.stdout


def test_mock_upstream_command() -> None:
    process, line = start_process([sys.executable, "-m", "app", "mock-upstream", "--port", "0"],
                                  "listening on")
    try:
        assert line.startswith("mock upstream listening on http://127.0.0.1:")
    finally:
        process.terminate()
        assert process.wait(10) == 0
