"""Typed bindings for the committed contract artifacts (``contracts/artifacts/<Name>.json``).

The artifacts are compiled deterministically and checked in (see ``contracts/README.md``), so
the server reads the exact ABI and bytecode that the contract tests ran, never a second copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, cast

from eth_typing import ABI
from eth_utils import keccak, to_checksum_address
from web3 import AsyncWeb3
from web3.contract import AsyncContract

ARTIFACTS_DIR = Path(__file__).resolve().parents[2] / "contracts" / "artifacts"

ContractName = Literal[
    "TestUSDC", "TollgateAccount", "TollgateAccountFactory", "TollgateSettlement"
]
CONTRACT_NAMES: tuple[ContractName, ...] = (
    "TestUSDC",
    "TollgateAccount",
    "TollgateAccountFactory",
    "TollgateSettlement",
)


@dataclass(frozen=True)
class ContractArtifacts:
    """The ABI and creation bytecode of one compiled contract."""

    name: str
    abi: ABI
    bytecode: bytes


# Cached because the artifacts are committed files that never change while the process runs.
@cache
def load_artifacts(name: ContractName) -> ContractArtifacts:
    """Read ``contracts/artifacts/<name>.json``."""
    raw = json.loads((ARTIFACTS_DIR / f"{name}.json").read_text())
    bytecode = str(raw["bytecode"]).removeprefix("0x")
    return ContractArtifacts(name=name, abi=cast(ABI, raw["abi"]), bytecode=bytes.fromhex(bytecode))


def bind_contract(w3: AsyncWeb3, name: ContractName, address: str) -> AsyncContract:
    """An ``AsyncContract`` for the deployed contract `name` at `address`."""
    return w3.eth.contract(address=to_checksum_address(address), abi=load_artifacts(name).abi)


def _abi_type(param: dict[str, Any]) -> str:
    if str(param["type"]).startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in param["components"])
        return f"({inner}){str(param['type'])[len('tuple') :]}"
    return str(param["type"])


@cache
def _custom_error_names() -> dict[bytes, str]:
    """4-byte selector -> custom error name, over every committed artifact."""
    names: dict[bytes, str] = {}
    for contract in CONTRACT_NAMES:
        for item in load_artifacts(contract).abi:
            if item["type"] != "error":
                continue
            entry = cast(dict[str, Any], item)
            types = ",".join(_abi_type(p) for p in entry["inputs"])
            names[keccak(text=f"{entry['name']}({types})")[:4]] = str(entry["name"])
    return names


def custom_error_name(revert_data: bytes) -> str | None:
    """The name of the custom error that `revert_data` encodes, if any artifact declares it."""
    return _custom_error_names().get(bytes(revert_data[:4])) if len(revert_data) >= 4 else None
