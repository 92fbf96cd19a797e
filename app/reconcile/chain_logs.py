"""The chain side: ``Settled`` events of the settlement contract and token transfers into
it, read with ``eth_getLogs`` over bounded block ranges, plus the receipts of
transactions the ledger names outside those ranges.

Logs are decoded by hand from their topics and data (two fixed layouts), so a log that
does not have the expected shape is skipped rather than trusted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3.types import FilterParams, LogReceipt

from app.chain.client import ChainClient
from app.chain.errors import RpcError
from app.reconcile.errors import ChainHistoryUnavailable, TooMuchToReconcile
from app.reconcile.records import SettledEvent, TokenTransfer

SETTLED_TOPIC = "0x" + keccak(text="Settled(address,uint256,uint8,bytes32)").hex()
TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()

# Blocks per eth_getLogs: hosted nodes refuse wide ranges or many results, so a refused
# range is split (down to BLOCKS_PER_QUERY_MIN) and the scan goes on at the smaller size.
BLOCKS_PER_QUERY = 2_000
BLOCKS_PER_QUERY_MIN = 16
LOGS_MAX = 1_000_000
# Receipts read one by one for rows whose transaction was outside the scanned blocks.
RECEIPTS_MAX = 1_000
RECEIPTS_IN_FLIGHT = 8


class ChainLogs:
    """Reads one chain's settlement contract and billing token."""

    def __init__(self, client: ChainClient, *, settlement: str, token: str,
                 blocks_per_query: int = BLOCKS_PER_QUERY) -> None:
        assert blocks_per_query >= BLOCKS_PER_QUERY_MIN
        self.client = client
        self.settlement = settlement.lower()
        self.token = token.lower()
        self.blocks_per_query = blocks_per_query

    @property
    def chain_id(self) -> int:
        return self.client.chain_id

    async def latest_block(self) -> int:
        return await self.client.block_number()

    async def deployment_block(self, latest: int) -> int:
        """The first block with the settlement contract's code (binary search on
        ``eth_getCode``): nothing of ours can be on chain before it. Needs a node that
        keeps old state (an archive node, anvil); otherwise give the start block."""
        try:
            if not await self.client.code_at(self.settlement, latest):
                raise ChainHistoryUnavailable(
                    f"no settlement contract at {self.settlement} on chain {self.chain_id}")
            low, high = 0, latest
            # Invariant: the code exists at `high`; each step halves [low, high].
            while low < high:
                middle = (low + high) // 2
                if await self.client.code_at(self.settlement, middle):
                    high = middle
                else:
                    low = middle + 1
        except RpcError as error:
            raise ChainHistoryUnavailable(
                f"the node cannot read old state ({error.rpc_message}); give the block the"
                " settlement contract was deployed in as the start block") from None
        return low

    async def settled_events(self, from_block: int, to_block: int) -> list[SettledEvent]:
        logs = await self._logs({"address": to_checksum_address(self.settlement),
                                 "topics": [SETTLED_TOPIC]}, from_block, to_block)
        return [event for log in logs if (event := decode_settled(log)) is not None]

    async def transfers_in(self, from_block: int, to_block: int) -> list[TokenTransfer]:
        """Token transfers whose recipient is the settlement contract."""
        recipient = "0x" + "00" * 12 + self.settlement[2:]
        logs = await self._logs({"address": to_checksum_address(self.token),
                                 "topics": [TRANSFER_TOPIC, None, recipient]},
                                from_block, to_block)
        return [transfer for log in logs
                if (transfer := decode_transfer(log, self.settlement)) is not None]

    async def receipt_logs(self, tx_hashes: Sequence[str]
                           ) -> tuple[list[SettledEvent], list[TokenTransfer]]:
        """Our events and transfers in the given transactions (at most ``RECEIPTS_MAX``)."""
        if len(tx_hashes) > RECEIPTS_MAX:
            raise TooMuchToReconcile(
                f"{len(tx_hashes)} ledger transactions lie outside the scanned blocks (at most"
                f" {RECEIPTS_MAX} are read one by one): start the scan earlier")
        gate = asyncio.Semaphore(RECEIPTS_IN_FLIGHT)

        async def read(tx_hash: str) -> list[LogReceipt]:
            async with gate:
                receipt = await self.client.receipt(tx_hash)
            # A reverted transaction moved nothing, whatever it logged before reverting.
            return list(receipt["logs"]) if receipt and receipt["status"] == 1 else []

        events: list[SettledEvent] = []
        transfers: list[TokenTransfer] = []
        for logs in await asyncio.gather(*(read(tx_hash) for tx_hash in tx_hashes)):
            for log in logs:
                address = str(log["address"]).lower()
                if address == self.settlement and (event := decode_settled(log)):
                    events.append(event)
                elif address == self.token and (
                        transfer := decode_transfer(log, self.settlement)):
                    transfers.append(transfer)
        return events, transfers

    async def _logs(self, query: dict[str, Any], from_block: int,
                    to_block: int) -> list[LogReceipt]:
        logs: list[LogReceipt] = []
        span = self.blocks_per_query
        start = from_block
        # Each pass reads a range or narrows the span, so the loop ends.
        while start <= to_block:
            end = min(to_block, start + span - 1)
            params: FilterParams = {**query, "fromBlock": start, "toBlock": end}  # type: ignore[typeddict-item]
            try:
                chunk = await self.client.rpc(self.client.w3.eth.get_logs(params))
            except RpcError:
                asked = end - start + 1
                if asked <= BLOCKS_PER_QUERY_MIN:
                    raise
                span = max(BLOCKS_PER_QUERY_MIN, asked // 4)
                continue
            logs.extend(chunk)
            if len(logs) > LOGS_MAX:
                raise TooMuchToReconcile(
                    f"more than {LOGS_MAX} logs in blocks {from_block}..{to_block}:"
                    " reconcile a narrower block range")
            start = end + 1
        return logs


def _word(data: bytes, index: int) -> int:
    return int.from_bytes(data[32 * index:32 * (index + 1)], "big")


def _address(topic: bytes) -> str | None:
    """The address in a 32-byte topic, or None if its upper 12 bytes are not zero."""
    if len(topic) != 32 or any(topic[:12]):
        return None
    return "0x" + topic[12:].hex()


def decode_settled(log: LogReceipt) -> SettledEvent | None:
    """``Settled(address indexed payer, uint256 amount, uint8 method, bytes32 indexed ref)``."""
    topics = [bytes(HexBytes(topic)) for topic in log["topics"]]
    data = bytes(HexBytes(log["data"]))
    if len(topics) != 3 or "0x" + topics[0].hex() != SETTLED_TOPIC or len(data) != 64:
        return None
    payer = _address(topics[1])
    if payer is None:
        return None
    return SettledEvent(
        reference="0x" + topics[2].hex(), payer=payer, amount_micros=_word(data, 0),
        method=_word(data, 1), tx_hash=HexBytes(log["transactionHash"]).to_0x_hex(),
        block_number=int(log["blockNumber"]), log_index=int(log["logIndex"]),
    )


def decode_transfer(log: LogReceipt, recipient: str) -> TokenTransfer | None:
    """``Transfer(address indexed from, address indexed to, uint256 value)`` to `recipient`."""
    topics = [bytes(HexBytes(topic)) for topic in log["topics"]]
    data = bytes(HexBytes(log["data"]))
    if len(topics) != 3 or "0x" + topics[0].hex() != TRANSFER_TOPIC or len(data) != 32:
        return None
    sender, to = _address(topics[1]), _address(topics[2])
    if sender is None or to != recipient:
        return None
    return TokenTransfer(
        sender=sender, amount_micros=_word(data, 0),
        tx_hash=HexBytes(log["transactionHash"]).to_0x_hex(),
        block_number=int(log["blockNumber"]), log_index=int(log["logIndex"]),
    )
