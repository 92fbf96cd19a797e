"""Fixtures for the Solidity contract tests: an in-process EVM (eth-tester + py-evm) running the
committed artifacts in contracts/artifacts/, named funded actors, signing helpers, revert
matching, and a gas table printed at the end of the run.

The chain and the base deployment are session-scoped; every test runs on a snapshot that is
reverted afterwards, so tests are isolated and the suite stays fast.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_tester import EthereumTester, PyEVMBackend
from eth_utils import keccak, to_checksum_address
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract
from web3.logs import DISCARD

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = ROOT / "contracts" / "artifacts"
CONTRACT_NAMES = ("TestUSDC", "TollgateAccount", "TollgateAccountFactory", "TollgateSettlement")

USDC = 10**6  # one USDC in base units
ETHER = 10**18
MAGIC_1271 = bytes.fromhex("1626ba7e")
INVALID_1271 = bytes.fromhex("ffffffff")
METHOD_SESSION_DEBIT = 1
METHOD_EIP3009 = 2
TX_GAS_LIMIT = 5_000_000

# label -> gas used; filled by Chain.send(label=...) and printed by pytest_terminal_summary.
GAS_USED: dict[str, int] = {}


# ------------------------------------------------------------------------------- artifacts


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """The committed artifact contracts/artifacts/<name>.json."""
    return json.loads((ARTIFACTS_DIR / f"{name}.json").read_text())


def _abi_type(param: dict[str, Any]) -> str:
    if param["type"].startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in param["components"])
        return f"({inner}){param['type'][len('tuple') :]}"
    return param["type"]


@cache
def _error_selectors() -> dict[bytes, tuple[str, list[str]]]:
    """4-byte selector -> (error name, argument types), over every artifact's custom errors."""
    errors: dict[bytes, tuple[str, list[str]]] = {}
    for name in CONTRACT_NAMES:
        for item in load_artifact(name)["abi"]:
            if item["type"] != "error":
                continue
            types = [_abi_type(p) for p in item["inputs"]]
            selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
            errors[selector] = (item["name"], types)
    return errors


def revert_data(exc: BaseException) -> bytes:
    """The raw revert data of a failed call/transaction raised through EthereumTesterProvider."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        return bytes.fromhex(data[2:])
    message = str(exc.args[0]) if exc.args else ""
    prefix = "execution reverted: "
    if message.startswith(prefix):
        payload = message[len(prefix) :]
        if payload.startswith(("b'", 'b"')):
            return ast.literal_eval(payload)
    raise AssertionError(f"not a revert with data: {exc!r}")


def decode_revert(exc: BaseException) -> tuple[str, tuple[Any, ...]]:
    """(custom error name, decoded arguments) of a revert."""
    data = revert_data(exc)
    known = _error_selectors().get(data[:4])
    if known is None:
        raise AssertionError(f"unknown revert data 0x{data.hex()}")
    name, types = known
    values = abi_decode(types, data[4:])
    return name, tuple(
        to_checksum_address(v) if t == "address" else v for t, v in zip(types, values, strict=True)
    )


@dataclass
class RevertInfo:
    name: str = ""
    args: tuple[Any, ...] = ()


@contextmanager
def reverts(error_name: str, *expected_args: Any) -> Iterator[RevertInfo]:
    """Assert that the block reverts with the custom error `error_name` (and these args)."""
    info = RevertInfo()
    try:
        yield info
    except AssertionError:
        raise
    except Exception as exc:
        info.name, info.args = decode_revert(exc)
        assert info.name == error_name, f"reverted with {info.name}{info.args}, not {error_name}"
        if expected_args:
            assert info.args == expected_args, f"{info.name} args {info.args} != {expected_args}"
        return
    raise AssertionError(f"did not revert (expected {error_name})")


# ------------------------------------------------------------------------------- chain


def actor(name: str) -> LocalAccount:
    """A deterministic eth-account key for a named test actor."""
    return Account.from_key(keccak(text=f"tollgate-contract-tests:{name}"))


@dataclass
class Chain:
    w3: Web3
    tester: EthereumTester
    funded: set[str] = field(default_factory=set)

    @property
    def chain_id(self) -> int:
        return self.w3.eth.chain_id

    def fund(self, who: LocalAccount, wei: int = 100 * ETHER) -> None:
        """Make `who` a managed, funded account that can send transactions with {"from": ...}."""
        if who.address in self.funded:
            return
        self.tester.add_account(who.key.to_0x_hex())
        self.w3.eth.send_transaction(
            {"from": self.w3.eth.accounts[0], "to": who.address, "value": wei}
        )
        self.funded.add(who.address)

    def contract(self, name: str, address: str) -> Contract:
        return self.w3.eth.contract(address=address, abi=load_artifact(name)["abi"])

    def deploy(self, name: str, *args: Any, sender: LocalAccount, label: str = "") -> Contract:
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        tx = factory.constructor(*args).transact({"from": sender.address})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx)
        assert receipt.status == 1
        GAS_USED.setdefault(label or f"deploy {name}", receipt.gasUsed)
        return self.contract(name, receipt.contractAddress)

    def send(self, call: Any, sender: LocalAccount, label: str = "", value: int = 0) -> Any:
        """Transact a prepared contract function call; record its gas under `label`."""
        # A fixed gas limit skips web3's gas estimation (a second execution of every call).
        tx: dict[str, Any] = {"from": sender.address, "gas": TX_GAS_LIMIT}
        if value:
            tx["value"] = value
        receipt = self.w3.eth.wait_for_transaction_receipt(call.transact(tx))
        if receipt.status != 1:
            # Mined but reverted: the failed transaction changed nothing but the sender's nonce
            # and balance, so replaying it as a call on the latest state raises its revert data.
            call.call(tx)
            raise AssertionError("transaction reverted but its replay did not")
        if label:
            GAS_USED[label] = receipt.gasUsed
        return receipt

    def now(self) -> int:
        """Timestamp of the latest block."""
        return self.w3.eth.get_block("latest")["timestamp"]

    def next_timestamp(self) -> int:
        """Timestamp the next transaction will execute at."""
        return self.tester.get_block_by_number("pending")["timestamp"]

    def advance(self, seconds: int) -> int:
        """Move the clock forward and mine a block; returns the new latest timestamp."""
        self.tester.time_travel(self.next_timestamp() + seconds)
        self.tester.mine_blocks()
        return self.now()


@dataclass
class Actors:
    deployer: LocalAccount  # TestUSDC owner; settlement admin
    operator: LocalAccount
    treasury: LocalAccount
    entry_point: LocalAccount  # stands in for the ERC-4337 EntryPoint in account tests
    alice: LocalAccount  # owner of smart accounts
    bob: LocalAccount
    carol: LocalAccount
    mallory: LocalAccount
    session: LocalAccount  # a session key (only signs, never sends)
    session2: LocalAccount


@dataclass
class Deployment:
    chain: Chain
    actors: Actors
    usdc: Contract
    other_token: Contract  # a second TestUSDC, for wrong-token refusals
    factory: Contract
    settlement: Contract

    def create_account(self, owner: LocalAccount, salt: int = 0, label: str = "") -> Contract:
        """Deploy (via the factory) the smart account of (owner, salt)."""
        address = self.factory.functions.getAddress(owner.address, salt).call()
        self.chain.send(
            self.factory.functions.createAccount(owner.address, salt),
            self.actors.deployer,
            label=label,
        )
        return self.chain.contract("TollgateAccount", address)

    def mint(self, to: str, amount: int, token: Contract | None = None) -> None:
        token = token or self.usdc
        self.chain.send(token.functions.mint(to, amount), self.actors.deployer)


@pytest.fixture(scope="session")
def chain() -> Chain:
    missing = [n for n in CONTRACT_NAMES if not (ARTIFACTS_DIR / f"{n}.json").exists()]
    if missing:
        pytest.fail(f"missing artifacts {missing}: run `npm ci && npm run compile`")
    tester = EthereumTester(PyEVMBackend())
    return Chain(w3=Web3(EthereumTesterProvider(tester)), tester=tester)


@pytest.fixture(scope="session")
def actors(chain: Chain) -> Actors:
    team = Actors(
        deployer=actor("deployer"),
        operator=actor("operator"),
        treasury=actor("treasury"),
        entry_point=actor("entry-point"),
        alice=actor("alice"),
        bob=actor("bob"),
        carol=actor("carol"),
        mallory=actor("mallory"),
        session=actor("session-key"),
        session2=actor("session-key-2"),
    )
    for who in vars(team).values():
        chain.fund(who)
    return team


@pytest.fixture(scope="session")
def deployment(chain: Chain, actors: Actors) -> Deployment:
    usdc = chain.deploy("TestUSDC", actors.deployer.address, sender=actors.deployer)
    other = chain.deploy("TestUSDC", actors.deployer.address, sender=actors.deployer, label="-")
    factory = chain.deploy(
        "TollgateAccountFactory", actors.entry_point.address, sender=actors.deployer
    )
    settlement = chain.deploy(
        "TollgateSettlement",
        usdc.address,
        actors.deployer.address,
        actors.operator.address,
        actors.treasury.address,
        sender=actors.deployer,
    )
    GAS_USED.pop("-", None)
    return Deployment(chain, actors, usdc, other, factory, settlement)


@pytest.fixture(autouse=True)
def _isolated(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run each test on a snapshot of the session chain and roll it back afterwards."""
    if "deployment" not in request.fixturenames and "chain" not in request.fixturenames:
        yield
        return
    chain: Chain = request.getfixturevalue("chain")
    request.getfixturevalue("deployment")
    snapshot = chain.tester.take_snapshot()
    yield
    chain.tester.revert_to_snapshot(snapshot)


# ------------------------------------------------------------------------------- signing


def random_nonce() -> bytes:
    return secrets.token_bytes(32)


def sign_typed(
    key: LocalAccount, domain: dict[str, Any], types: dict[str, Any], message: dict[str, Any]
) -> Any:
    return Account.sign_typed_data(key.key, domain, types, message)


def usdc_domain(chain: Chain, usdc: Contract) -> dict[str, Any]:
    return {
        "name": "USD Coin",
        "version": "2",
        "chainId": chain.chain_id,
        "verifyingContract": usdc.address,
    }


_AUTH_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]


@dataclass
class Authorization:
    """An EIP-3009 authorization and the signed message."""

    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes
    digest: bytes
    v: int = 0
    r: bytes = b""
    s: bytes = b""
    signature: bytes = b""

    @property
    def args(self) -> tuple[Any, ...]:
        return (
            self.from_,
            self.to,
            self.value,
            self.valid_after,
            self.valid_before,
            self.nonce,
        )

    @property
    def vrs(self) -> tuple[int, bytes, bytes]:
        return (self.v, self.r, self.s)


def authorization(
    dep: Deployment,
    signer: LocalAccount,
    from_: str,
    to: str,
    value: int,
    *,
    kind: str = "TransferWithAuthorization",
    valid_after: int = 0,
    valid_before: int | None = None,
    nonce: bytes | None = None,
    wrap_for_account: Contract | None = None,
) -> Authorization:
    """Sign an EIP-3009 authorization with `signer`. With `wrap_for_account`, the signature is
    the account owner's ERC-1271 signature (the digest wrapped in the account's own domain)."""
    if valid_before is None:
        valid_before = dep.chain.next_timestamp() + 3600
    nonce = nonce or random_nonce()
    message = {
        "from": from_,
        "to": to,
        "value": value,
        "validAfter": valid_after,
        "validBefore": valid_before,
        "nonce": nonce,
    }
    domain = usdc_domain(dep.chain, dep.usdc)
    signed = sign_typed(signer, domain, {kind: _AUTH_FIELDS}, message)
    auth = Authorization(from_, to, value, valid_after, valid_before, nonce, signed.message_hash)
    if wrap_for_account is not None:
        auth.signature = sign_1271(dep.chain, signer, wrap_for_account.address, auth.digest)
    else:
        auth.v, auth.r, auth.s = signed.v, signed.r.to_bytes(32), signed.s.to_bytes(32)
        auth.signature = bytes(signed.signature)
    return auth


def account_domain(chain: Chain, account: str) -> dict[str, Any]:
    return {
        "name": "TollgateAccount",
        "version": "1",
        "chainId": chain.chain_id,
        "verifyingContract": account,
    }


def sign_1271(chain: Chain, signer: LocalAccount, account: str, hash_: bytes) -> bytes:
    """`signer`'s ERC-1271 signature of `hash_` for the TollgateAccount at `account`:
    EIP-712 TollgateMessage(bytes32 hash) in the account's own domain."""
    signed = sign_typed(
        signer,
        account_domain(chain, account),
        {"TollgateMessage": [{"name": "hash", "type": "bytes32"}]},
        {"hash": hash_},
    )
    return bytes(signed.signature)


def sign_raw(signer: LocalAccount, hash_: bytes) -> bytes:
    """A raw (unwrapped) ECDSA signature over `hash_`."""
    return bytes(Account.unsafe_sign_hash(hash_, signer.key).signature)


def sign_eth_message(signer: LocalAccount, hash_: bytes) -> bytes:
    """eth_sign / personal_sign over a 32-byte hash (the userOp signature scheme)."""
    return bytes(Account.sign_message(encode_defunct(primitive=hash_), signer.key).signature)


def settlement_domain(chain: Chain, settlement: Contract) -> dict[str, Any]:
    return {
        "name": "TollgateSettlement",
        "version": "1",
        "chainId": chain.chain_id,
        "verifyingContract": settlement.address,
    }


def sign_voucher(
    dep: Deployment,
    signer: LocalAccount,
    account: str,
    cumulative: int,
    deadline: int | None = None,
    token: str | None = None,
) -> tuple[int, bytes]:
    """A DebitVoucher signed by `signer`; returns (deadline, signature)."""
    if deadline is None:
        deadline = dep.chain.next_timestamp() + 3600
    signed = sign_typed(
        signer,
        settlement_domain(dep.chain, dep.settlement),
        {
            "DebitVoucher": [
                {"name": "account", "type": "address"},
                {"name": "token", "type": "address"},
                {"name": "cumulativeAmount", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ]
        },
        {
            "account": account,
            "token": token or dep.usdc.address,
            "cumulativeAmount": cumulative,
            "deadline": deadline,
        },
    )
    return deadline, bytes(signed.signature)


def policy(
    token: str,
    payee: str,
    cap: int,
    period: int,
    valid_until: int,
) -> tuple[str, str, int, int, int]:
    """A SessionPolicy tuple (token, payee, capPerPeriod, periodSeconds, validUntil)."""
    return (token, payee, cap, period, valid_until)


def event_args(contract: Contract, receipt: Any, name: str) -> list[Any]:
    """Decoded args of every `name` event that `contract` emitted in `receipt`."""
    event = getattr(contract.events, name)()
    return [log["args"] for log in event.process_receipt(receipt, errors=DISCARD)]


# ------------------------------------------------------------------------------- gas table


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not GAS_USED or os.environ.get("TOLLGATE_NO_GAS_TABLE"):
        return
    width = max(len(label) for label in GAS_USED)
    terminalreporter.section("contract gas used")
    terminalreporter.write_line(f"{'operation':<{width}}  {'gas':>9}")
    for label in sorted(GAS_USED):
        terminalreporter.write_line(f"{label:<{width}}  {GAS_USED[label]:>9,}")
