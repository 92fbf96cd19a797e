"""The settlement contract as the worker sees it: what it reads, what it sends, what it looks for.

Every read goes through ``ChainClient`` (timeouts, one error tree). The one thing the worker
looks for on chain is the ``Settled(payer, amount, method, ref)`` event of a reference: it is
the proof that a collection happened, whoever sent the transaction and whether or not its
hash was ever stored. It is found in a known transaction's receipt, or else by
``eth_getLogs`` filtered on the indexed ``ref`` topic, searched backwards from the latest
block in windows (many providers bound the range of one query).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3.contract.async_contract import AsyncContractFunction
from web3.exceptions import TransactionNotFound
from web3.types import FilterParams, TxReceipt

from app.chain.client import ChainClient
from app.chain.contracts import bind_contract
from app.chain.errors import TransactionReverted

SETTLED_TOPIC = keccak(text="Settled(address,uint256,uint8,bytes32)")
METHOD_SESSION_DEBIT = 1
# One eth_getLogs query covers at most this many blocks, and a search at most this many in
# all: the event of a pending row is normally minutes old, and the search only runs when the
# contract already says the reference was used.
LOGS_WINDOW_BLOCKS = 2_000
LOGS_LOOKBACK_BLOCKS = 200_000


@dataclass(frozen=True, slots=True)
class SettledEvent:
    """One ``Settled`` event: the collection a reference names, where it was mined."""

    reference: str
    payer: str
    amount_micros: int
    method: int
    tx_hash: str
    block_number: int


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The latest block: its number and its time (the clock vouchers' deadlines are read on)."""

    number: int
    timestamp_s: int


class SettlementContract:
    """Reads and calls of one TollgateSettlement deployment."""

    def __init__(self, client: ChainClient, address: str) -> None:
        self.client = client
        self.address = to_checksum_address(address)
        self.contract = bind_contract(client.w3, "TollgateSettlement", address)

    async def head(self) -> ChainHead:
        block = await self.client.rpc(self.client.w3.eth.get_block("latest"))
        return ChainHead(number=int(block["number"]), timestamp_s=int(block["timestamp"]))

    async def collected(self, account: str, session_key: str) -> int:
        """What was collected so far from ``account`` under ``session_key``'s vouchers."""
        function = self.contract.functions.collected(
            to_checksum_address(account), to_checksum_address(session_key))
        return int(await self.client.read(function))

    async def session_available(self, account: str, session_key: str) -> int | None:
        """What the account's policy lets this contract pull now under the key (0 when the key
        is revoked, expired or spent for the period); None if the account cannot say."""
        account_contract = bind_contract(self.client.w3, "TollgateAccount", account)
        function = account_contract.functions.sessionAvailable(to_checksum_address(session_key))
        try:
            return int(await self.client.read(function))
        except TransactionReverted:
            return None

    async def reference_used(self, reference: str) -> bool:
        return bool(await self.client.read(
            self.contract.functions.referenceUsed(HexBytes(reference))))

    def collect(self, *, account: str, session_key: str, amount_micros: int,
                cumulative_micros: int, deadline_s: int, reference: str, signature: bytes
                ) -> AsyncContractFunction:
        """The ``collect`` call (operator only) for a voucher of ``session_key``."""
        return self.contract.functions.collect(
            to_checksum_address(account), to_checksum_address(session_key), amount_micros,
            cumulative_micros, deadline_s, HexBytes(reference), signature)

    async def transaction_known(self, tx_hash: str) -> bool:
        """Whether the node knows the transaction (mined or waiting in its pool)."""
        return bool(await self.client.rpc(self._transaction_or_none(tx_hash)))

    async def _transaction_or_none(self, tx_hash: str) -> Any:
        try:
            return await self.client.w3.eth.get_transaction(HexBytes(tx_hash))
        except TransactionNotFound:
            return None

    def settled_in(self, receipt: TxReceipt, reference: str) -> SettledEvent | None:
        """The ``Settled`` event of ``reference`` in a mined transaction's receipt."""
        for log in receipt["logs"]:
            event = self._settled(log)
            if event is not None and event.reference == reference:
                return event
        return None

    async def find_settled(self, reference: str, head: ChainHead) -> SettledEvent | None:
        """The ``Settled`` event of ``reference``, searched backwards from ``head``."""
        to_block = head.number
        oldest = max(0, head.number - LOGS_LOOKBACK_BLOCKS)
        while to_block >= oldest:
            from_block = max(oldest, to_block - LOGS_WINDOW_BLOCKS + 1)
            query: FilterParams = {
                "address": self.address,
                "topics": [HexBytes(SETTLED_TOPIC).to_0x_hex(), None, reference],  # type: ignore[list-item]
                "fromBlock": from_block,
                "toBlock": to_block,
            }
            for log in await self.client.rpc(self.client.w3.eth.get_logs(query)):
                event = self._settled(log)
                if event is not None and event.reference == reference:
                    return event
            to_block = from_block - 1
        return None

    def _settled(self, log: Any) -> SettledEvent | None:
        topics = log["topics"]
        if to_checksum_address(log["address"]) != self.address or len(topics) != 3 \
                or bytes(topics[0]) != SETTLED_TOPIC:
            return None
        amount, method = abi_decode(["uint256", "uint8"], bytes(log["data"]))
        return SettledEvent(
            reference=HexBytes(topics[2]).to_0x_hex().lower(),
            payer=to_checksum_address(bytes(topics[1])[-20:]).lower(),
            amount_micros=int(amount), method=int(method),
            tx_hash=HexBytes(log["transactionHash"]).to_0x_hex().lower(),
            block_number=int(log["blockNumber"]),
        )
