"""The settlement reference: the bytes32 that names one collection in the ledger and on chain.

It is derived, not random, from what identifies the collection: the chain and contract, the
account, the session key, the key's cumulative total after this collection (which only ever
grows, so no two successful collections under one key share it), and the number of earlier
attempts at that same total that failed (a failed attempt used no reference on chain, but its
row keeps the reference unique in the ledger). Two workers that decide on the same collection
derive the same reference, so Postgres lets only one of them record it; a row's reference is
stored before anything is sent and every resend reuses it, and the contract accepts each
reference once, so a collection can never be made twice.
"""

from __future__ import annotations

from eth_utils import keccak

DOMAIN_TAG = b"tollgate:settlement:collect:"


def settlement_reference(*, chain_id: int, settlement: str, account: str, session_key: str,
                         cumulative_micros: int, attempt: int) -> str:
    """The 0x-hex bytes32 reference of a collection (lowercase, 66 characters)."""
    assert cumulative_micros > 0 and attempt >= 0
    material = (DOMAIN_TAG + chain_id.to_bytes(32, "big") + _address(settlement)
                + _address(account) + _address(session_key)
                + cumulative_micros.to_bytes(32, "big") + attempt.to_bytes(32, "big"))
    return "0x" + keccak(material).hex()


def _address(value: str) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x"))
    assert len(raw) == 20, "an address is 20 bytes"
    return raw
