"""The errors of the chain client: one small tree, so callers can tell "the chain said no"
(a revert) from "the chain is not there" (unavailable, timeout) without knowing web3.

    ChainError                 any failure talking to the chain
    ├── RpcUnavailable         connection refused, DNS failure, HTTP 5xx from the node
    ├── RpcTimeout             the node did not answer within the call timeout
    ├── RpcError               the node answered with a JSON-RPC error (code, message)
    ├── ChainIdMismatch        the node serves another chain than the configured one
    ├── TransactionReverted    a call or transaction reverted (custom error name if known)
    └── ConfirmationTimeout    a transaction was not confirmed within the wait

These are operating errors, not client errors: the HTTP edge never sees them raw; the code that
calls the chain turns them into ``app.errors.ServiceUnavailable`` (or a refusal) where it decides.
web3 and aiohttp exceptions are translated into this tree in exactly one place,
``app.chain.client.ChainClient.rpc``.
"""

from __future__ import annotations


class ChainError(Exception):
    """Base of every chain failure."""


class RpcUnavailable(ChainError):
    """The node could not be reached (connection refused, DNS, dropped connection, HTTP 5xx)."""


class RpcTimeout(ChainError):
    """The node did not answer within the call timeout."""


class RpcError(ChainError):
    """The node answered with a JSON-RPC error."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(f"{message} (code {code})" if code is not None else message)
        self.code = code
        self.rpc_message = message


class ChainIdMismatch(ChainError):
    """The node's ``eth_chainId`` differs from the configured chain id."""

    def __init__(self, *, expected: int, actual: int) -> None:
        super().__init__(f"node serves chain {actual}, configured chain is {expected}")
        self.expected = expected
        self.actual = actual


class TransactionReverted(ChainError):
    """A call, gas estimation or mined transaction reverted.

    ``error_name`` is the custom error's name when a committed artifact declares its selector
    (``None`` for a plain ``revert()``, a panic or an unknown error); ``data`` is the raw revert
    data; ``tx_hash`` is set when a mined transaction reverted.
    """

    def __init__(
        self, *, error_name: str | None, data: bytes = b"", tx_hash: str | None = None
    ) -> None:
        what = f"transaction {tx_hash}" if tx_hash else "call"
        super().__init__(f"{what} reverted with {error_name or 'no known error'}")
        self.error_name = error_name
        self.data = data
        self.tx_hash = tx_hash


class ConfirmationTimeout(ChainError):
    """A transaction was not mined with the wanted confirmations within the wait."""

    def __init__(self, *, tx_hash: str, confirmations: int, timeout_s: float) -> None:
        super().__init__(
            f"transaction {tx_hash} not confirmed {confirmations}x within {timeout_s:g} s"
        )
        self.tx_hash = tx_hash
        self.confirmations = confirmations
        self.timeout_s = timeout_s
