"""`tollgate dev-wallet` signs locally, keeps its key local, and gets a working token."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.conftest import RunningTollgate


async def dev_wallet(url: str, state_dir: Path) -> dict[str, object]:
    # Asynchronous: the Tollgate under test is served by this very event loop.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "dev-wallet", "--url", url, "--state-dir", str(state_dir),
        "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout)  # type: ignore[no-any-return]


async def test_dev_wallet_token_works_and_the_wallet_is_reused(
    tollgate: RunningTollgate, tmp_path: Path
) -> None:
    first = await dev_wallet(tollgate.url, tmp_path)
    second = await dev_wallet(tollgate.url, tmp_path)
    assert first["wallet"] == second["wallet"], "one dev wallet per state dir"
    assert first["account"] == second["account"]
    assert first["session_key"] != second["session_key"], "a fresh session key each time"
    key_file = tmp_path / "dev-wallet.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    headers = {"Authorization": f"Bearer {second['token']}"}
    async with aiohttp.ClientSession(headers=headers) as http, http.post(
        f"{tollgate.v1}/chat/completions",
        json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        assert response.status == 200


def test_dev_wallet_explains_an_unreachable_server(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "dev-wallet", "--url", "http://127.0.0.1:9",
         "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "is `tollgate serve` running" in result.stderr
    assert "Traceback" not in result.stderr
