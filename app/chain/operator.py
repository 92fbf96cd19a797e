"""The operator's wallet: signs and sends Tollgate's own transactions (settlements, sweeps).

Nonces are kept locally so several transactions can be in flight at once: the ``pending`` nonce
is read from the node once, then nonces are taken under a lock. A nonce is only consumed when
the node accepted the transaction, so a failed send never leaves a gap that would stall every
later transaction; a "nonce too low" answer (another sender, or a restart) triggers a resync.
"""

from __future__ import annotations

import asyncio
from typing import Any

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3.contract.async_contract import AsyncContractFunction
from web3.types import TxParams, Wei

from app.chain.client import ChainClient
from app.chain.errors import RpcError

GWEI = 10**9
DEFAULT_PRIORITY_FEE_WEI = 1 * GWEI
DEFAULT_GAS_MARGIN_PERCENT = 20
# The fee cap covers this many doublings of the base fee (+12.5% per full block in EIP-1559),
# so a transaction stays includable for several blocks while fees rise.
BASE_FEE_MULTIPLIER = 2
# How nodes say the nonce was already used: geth / anvil, and the in-process EVM (py-evm).
STALE_NONCE_MESSAGES = ("nonce too low", "invalid transaction nonce")
# One resync is enough: a second "nonce too low" right after a fresh read is not a race.
NONCE_RESYNC_ATTEMPTS = 1


class OperatorWallet:
    """Sends EIP-1559 transactions from the operator's key through a ``ChainClient``."""

    def __init__(
        self,
        client: ChainClient,
        account: LocalAccount,
        *,
        priority_fee_wei: int = DEFAULT_PRIORITY_FEE_WEI,
        gas_margin_percent: int = DEFAULT_GAS_MARGIN_PERCENT,
    ) -> None:
        self._client = client
        self._account = account
        self._priority_fee_wei = priority_fee_wei
        self._gas_margin_percent = gas_margin_percent
        self._next_nonce: int | None = None
        self._nonce_lock = asyncio.Lock()

    def __repr__(self) -> str:
        # The key must never reach a log line, so only the address is shown.
        return f"OperatorWallet(address={self.address})"

    @property
    def address(self) -> str:
        """The operator's checksummed address."""
        return str(self._account.address)

    async def transact(
        self, function: AsyncContractFunction, *, value: int = 0, gas: int | None = None
    ) -> HexBytes:
        """Send a call of a bound contract function; returns the transaction hash."""
        data = function._encode_transaction_data()
        return await self.send(to=str(function.address), data=HexBytes(data), value=value, gas=gas)

    async def send(
        self, *, to: str | None, data: bytes = b"", value: int = 0, gas: int | None = None
    ) -> HexBytes:
        """Sign and send a transaction; returns its hash once the node accepted it.

        ``to=None`` creates a contract from ``data`` (creation code + constructor args).

        Without `gas`, the gas is estimated (a revert then raises ``TransactionReverted``
        before anything is sent) and raised by the margin."""
        if gas is None:
            estimate: TxParams = {"from": self._account.address, "data": data,
                                  "value": Wei(value)}
            if to is not None:
                estimate["to"] = to
            estimated = await self._client.rpc(self._client.w3.eth.estimate_gas(estimate))
            gas = estimated * (100 + self._gas_margin_percent) // 100
        max_priority, max_fee = await self._fees()
        tx: dict[str, Any] = {
            "type": 2,
            "chainId": self._client.chain_id,
            "data": data,
            "value": value,
            "gas": gas,
            "maxPriorityFeePerGas": max_priority,
            "maxFeePerGas": max_fee,
        }
        if to is not None:
            tx["to"] = to
        async with self._nonce_lock:
            return await self._send_with_nonce(tx)

    async def _send_with_nonce(self, tx: dict[str, Any]) -> HexBytes:
        """Sign `tx` with the next nonce and send it; the caller holds the nonce lock."""
        for attempt in range(NONCE_RESYNC_ATTEMPTS + 1):
            nonce = self._next_nonce
            if nonce is None:
                nonce = await self._client.rpc(
                    self._client.w3.eth.get_transaction_count(self._account.address, "pending")
                )
            signed = self._account.sign_transaction({**tx, "nonce": nonce})
            try:
                tx_hash = await self._client.rpc(
                    self._client.w3.eth.send_raw_transaction(signed.raw_transaction)
                )
            except RpcError as exc:
                # The node's view wins after any refusal; "nonce too low" is worth one retry.
                self._next_nonce = None
                stale = any(m in str(exc).lower() for m in STALE_NONCE_MESSAGES)
                if stale and attempt < NONCE_RESYNC_ATTEMPTS:
                    continue
                raise
            except BaseException:
                # Unknown whether the node took it (timeout, cancellation): re-read next time.
                self._next_nonce = None
                raise
            self._next_nonce = nonce + 1
            return HexBytes(tx_hash)
        raise AssertionError("unreachable: the nonce loop returns or raises")

    async def _fees(self) -> tuple[int, int]:
        """(maxPriorityFeePerGas, maxFeePerGas) from the latest block's base fee."""
        block = await self._client.rpc(self._client.w3.eth.get_block("latest"))
        base_fee = int(block.get("baseFeePerGas", 0))
        return self._priority_fee_wei, base_fee * BASE_FEE_MULTIPLIER + self._priority_fee_wei
