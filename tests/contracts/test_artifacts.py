"""The committed contract artifacts are exactly what a fresh, pinned compile produces."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .conftest import ARTIFACTS_DIR, CONTRACT_NAMES, ROOT


def test_artifacts_have_expected_shape() -> None:
    for name in CONTRACT_NAMES:
        artifact = json.loads((ARTIFACTS_DIR / f"{name}.json").read_text())
        assert sorted(artifact) == [
            "abi",
            "bytecode",
            "compiler",
            "contractName",
            "deployedBytecode",
            "sourceName",
        ]
        assert artifact["contractName"] == name
        assert artifact["bytecode"].startswith("0x6")
        assert artifact["compiler"]["settings"] == {
            "evmVersion": "prague",
            "metadata": {"appendCBOR": False, "bytecodeHash": "none"},
            "optimizer": {"enabled": True, "runs": 200},
        }
        pinned = json.loads((ROOT / "package.json").read_text())["devDependencies"]["solc"]
        assert artifact["compiler"]["version"].startswith(f"{pinned}+commit.")
        assert len(artifact["deployedBytecode"]) // 2 - 1 <= 24_576  # EIP-170 size limit


def test_committed_artifacts_match_fresh_compile() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot recompile the contracts")
    if not (ROOT / "node_modules" / "solc" / "package.json").exists():
        pytest.skip("node_modules/solc is absent: run `npm ci` to check the committed artifacts")
    result = subprocess.run(
        [node, "contracts/compile.mjs", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
