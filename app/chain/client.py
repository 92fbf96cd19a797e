"""The server's async chain client: reads, calls and receipt waits with explicit timeouts, and
the one place where web3 / aiohttp exceptions become ``app.chain.errors``."""

from __future__ import annotations

import ast
import asyncio
import math
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
from eth_typing import BlockIdentifier
from eth_utils import to_checksum_address
from eth_utils.exceptions import ValidationError as EvmValidationError
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.contract.async_contract import AsyncContractFunction
from web3.exceptions import (
    ContractLogicError,
    ProviderConnectionError,
    TimeExhausted,
    TransactionNotFound,
    Web3Exception,
    Web3RPCError,
)
from web3.types import TxParams, TxReceipt

from app.chain.contracts import custom_error_name
from app.chain.errors import (
    ChainError,
    ChainIdMismatch,
    ConfirmationTimeout,
    RpcError,
    RpcTimeout,
    RpcUnavailable,
    TransactionReverted,
)

T = TypeVar("T")


def _revert_exception_types() -> tuple[type[BaseException], ...]:
    """web3's revert exception, plus eth-tester's: the in-process EVM provider (tests, dev
    chain) raises its own ``TransactionFailed`` for a revert instead of a web3 error."""
    try:
        from eth_tester.exceptions import TransactionFailed
    except ImportError:  # eth-tester is a test / dev dependency only
        return (ContractLogicError,)
    return (ContractLogicError, TransactionFailed)


REVERT_EXCEPTIONS = _revert_exception_types()

DEFAULT_CALL_TIMEOUT_S = 10.0
DEFAULT_POLL_INTERVAL_S = 0.5
DEFAULT_RECEIPT_TIMEOUT_S = 120.0


class ChainClient:
    """An ``AsyncWeb3`` bound to one chain id, with a timeout on every request."""

    def __init__(
        self,
        w3: AsyncWeb3,
        chain_id: int,
        *,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        if call_timeout_s <= 0 or poll_interval_s <= 0:
            raise ValueError("timeouts and poll interval must be positive")
        self.w3 = w3
        self.chain_id = chain_id
        self.call_timeout_s = call_timeout_s
        self.poll_interval_s = poll_interval_s

    @classmethod
    async def connect(
        cls,
        rpc_url: str,
        chain_id: int,
        *,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ) -> ChainClient:
        """A client for the JSON-RPC node at `rpc_url`, checked to serve `chain_id`.

        web3's own retries are off: a retry loop hidden under our timeout would only make
        "the node is down" slower to report; callers decide whether to retry."""
        provider = AsyncHTTPProvider(
            rpc_url,
            request_kwargs={"timeout": aiohttp.ClientTimeout(total=call_timeout_s)},
            exception_retry_configuration=None,
        )
        client = cls(
            AsyncWeb3(provider),
            chain_id,
            call_timeout_s=call_timeout_s,
            poll_interval_s=poll_interval_s,
        )
        try:
            await client.verify_chain_id()
        except BaseException:
            await client.close()
            raise
        return client

    async def close(self) -> None:
        """Close the provider's HTTP session, if it has one."""
        disconnect = getattr(self.w3.provider, "disconnect", None)
        if disconnect is not None:
            await disconnect()

    async def rpc(self, request: Awaitable[T]) -> T:
        """Await one chain request under the call timeout, translating every web3 / aiohttp
        failure into a ``ChainError``. This is the only place that translation happens."""
        try:
            async with asyncio.timeout(self.call_timeout_s):
                return await request
        except ChainError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError, TimeExhausted) as exc:
            raise RpcTimeout(f"chain request timed out after {self.call_timeout_s:g} s") from exc
        except REVERT_EXCEPTIONS as exc:
            data = _revert_data(exc)
            raise TransactionReverted(error_name=custom_error_name(data), data=data) from exc
        except Web3RPCError as exc:
            raise _rpc_error(exc) from exc
        except EvmValidationError as exc:
            # The in-process EVM rejects an invalid transaction (nonce, balance) with py-evm's
            # ValidationError where a real node answers a JSON-RPC error.
            raise RpcError(str(exc)) from exc
        except aiohttp.ClientResponseError as exc:
            raise RpcUnavailable(f"chain node answered HTTP {exc.status}") from exc
        except (aiohttp.ClientError, ProviderConnectionError, OSError) as exc:
            raise RpcUnavailable(f"chain node unreachable: {exc}") from exc
        except Web3Exception as exc:
            raise RpcError(str(exc)) from exc

    async def verify_chain_id(self) -> None:
        """Raise ``ChainIdMismatch`` unless the node serves the configured chain."""
        actual = await self.rpc(self.w3.eth.chain_id)
        if actual != self.chain_id:
            raise ChainIdMismatch(expected=self.chain_id, actual=actual)

    async def block_number(self) -> int:
        """The latest block number."""
        return int(await self.rpc(self.w3.eth.block_number))

    async def code_at(self, address: str, block: BlockIdentifier = "latest") -> bytes:
        """The runtime code at `address` (empty for an EOA or an undeployed account)."""
        return bytes(await self.rpc(self.w3.eth.get_code(to_checksum_address(address), block)))

    async def call(self, tx: TxParams, block: BlockIdentifier = "latest") -> bytes:
        """Raw ``eth_call``; a revert raises ``TransactionReverted``."""
        return bytes(await self.rpc(self.w3.eth.call(tx, block)))

    async def read(self, function: AsyncContractFunction, block: BlockIdentifier = "latest") -> Any:
        """Call a bound contract function (a view) and return its decoded result."""
        return await self.rpc(function.call(block_identifier=block))

    async def receipt(self, tx_hash: HexBytes | str) -> TxReceipt | None:
        """The receipt of `tx_hash`, or ``None`` while it is not mined."""
        return await self.rpc(self._receipt_or_none(tx_hash))

    async def _receipt_or_none(self, tx_hash: HexBytes | str) -> TxReceipt | None:
        try:
            return await self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None

    async def wait_for_receipt(
        self,
        tx_hash: HexBytes | str,
        *,
        confirmations: int = 1,
        timeout_s: float = DEFAULT_RECEIPT_TIMEOUT_S,
    ) -> TxReceipt:
        """Wait until `tx_hash` is mined and `confirmations` blocks deep (1 = in the latest
        block). A mined but reverted transaction raises ``TransactionReverted``; no receipt
        in time raises ``ConfirmationTimeout``.

        The receipt is fetched again on every poll, so a transaction dropped by a reorg is
        waited for again rather than reported from a stale receipt."""
        if confirmations < 1:
            raise ValueError("confirmations must be at least 1")
        tx_hex = HexBytes(tx_hash).to_0x_hex()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # The loop is bounded by the deadline and, independently, by an attempt count, so a
        # misbehaving clock cannot make it spin forever.
        for _ in range(math.ceil(timeout_s / self.poll_interval_s) + 1):
            receipt = await self.receipt(tx_hex)
            if receipt is not None:
                depth = await self.block_number() - int(receipt["blockNumber"]) + 1
                if depth >= confirmations:
                    if receipt["status"] != 1:
                        raise await self._reverted(tx_hex, receipt)
                    return receipt
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(self.poll_interval_s, remaining))
        raise ConfirmationTimeout(tx_hash=tx_hex, confirmations=confirmations, timeout_s=timeout_s)

    async def _reverted(self, tx_hex: str, receipt: TxReceipt) -> TransactionReverted:
        """Why a mined transaction reverted: receipts carry no revert data, so the transaction
        is replayed as a call on the state before its block. Transactions earlier in the same
        block are not replayed, so the reason is best effort (``None`` if the replay passes)."""
        tx = await self.rpc(self.w3.eth.get_transaction(HexBytes(tx_hex)))
        replay: TxParams = {
            "from": tx["from"],
            "to": tx["to"],
            "data": tx["input"],
            "value": tx["value"],
            "gas": tx["gas"],
        }
        try:
            await self.call(replay, int(receipt["blockNumber"]) - 1)
        except TransactionReverted as exc:
            return TransactionReverted(error_name=exc.error_name, data=exc.data, tx_hash=tx_hex)
        return TransactionReverted(error_name=None, tx_hash=tx_hex)


def _revert_data(exc: BaseException) -> bytes:
    """The raw revert data carried by a revert exception (empty if none)."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return b""
    # eth-tester reports custom errors as "execution reverted: b'...'" in the message.
    message = str(exc.args[0]) if exc.args else ""
    payload = message.removeprefix("execution reverted: ")
    if payload != message and payload.startswith(("b'", 'b"')):
        try:
            value = ast.literal_eval(payload)
        except (ValueError, SyntaxError):
            return b""
        return value if isinstance(value, bytes) else b""
    return b""


def _rpc_error(exc: Web3RPCError) -> RpcError:
    response = exc.rpc_response or {}
    error = response.get("error") if isinstance(response, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        message = str(error.get("message", exc))
        return RpcError(message, code=code if isinstance(code, int) else None)
    return RpcError(str(exc))
