"""``tollgate serve`` and ``tollgate migrate`` as a user runs them: real processes."""

from __future__ import annotations

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


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tgs-", dir="/tmp"))
    yield path


async def test_embedded_defaults_drain_and_reuse(state_dir: Path) -> None:
    process, url = serve(state_dir, "--port", "0")
    try:
        token = await session_token(url)
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
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    postmaster = state_dir / "postgres" / "postmaster.pid"
    assert not postmaster.exists(), "embedded Postgres was stopped"
    assert not (state_dir / "redis" / "redis.pid").exists(), "embedded Redis was stopped"

    # A second start reuses the state dir: same database, already migrated, same token key.
    process, url = serve(state_dir, "--port", "0")
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/health/ready") as response:
            assert response.status == 200
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
        again = await client.chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "hi"}])
        assert again.choices[0].message.content, "the session survives a restart"
    finally:
        assert stop(process) == 0
    stderr = process.stderr.read() if process.stderr else ""
    assert "Running upgrade" not in stderr, "migrations were already applied"


async def test_workers_share_one_port(
    state_dir: Path, postgres_url: str, redis_url: str
) -> None:
    port = free_port()
    env = clean_env(DATABASE_URL=postgres_url, REDIS_URL=redis_url)
    process, url = serve(state_dir, "--port", str(port), "--workers", "2", env=env)
    try:
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
