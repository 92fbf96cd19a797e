"""Debit vouchers: what a session key signs so Tollgate may collect, and how they are kept.

The settlement contract collects only what a session key authorized: an EIP-712
``DebitVoucher(address account,address token,uint256 cumulativeAmount,uint256 deadline)``
in the contract's own domain (name "TollgateSettlement", version "1", chainId,
verifyingContract = the settlement contract). The server never holds the key, so the
agent signs vouchers and posts them (``POST /v1/vouchers``); the worker uses the best
one stored. The digest is computed here exactly as the contract's ``voucherDigest``
does (a test compares the two with an ``eth_call``), so a voucher accepted here is one
the contract accepts.

Decisions:

- The account is never in the body: it is the session's smart account, and the signer
  must be the session's own key. A voucher for another account, or signed by another
  key, does not recover to that key and is refused.
- A voucher is stored only if it is not lower than the stored one for the same key
  (same total with a later or equal deadline is accepted, so a re-post is idempotent and
  a deadline can be extended). The comparison and the write are one statement.
- ``v`` may be 27/28 or 0/1; it is stored as 27/28 because the contract accepts only those.
  High-s signatures are refused, as the contract refuses them.
- Amounts are decimal strings of micro-USD (= USDC base units), at most a BIGINT.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from eth_abi import encode as abi_encode
from eth_utils import keccak, to_checksum_address
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.chain.signatures import recover_eoa
from app.errors import InvalidRequest
from app.storage.tables import vouchers

DOMAIN_NAME = "TollgateSettlement"
DOMAIN_VERSION = "1"
PRIMARY_TYPE = "DebitVoucher"
VOUCHER_FIELDS: tuple[dict[str, str], ...] = (
    {"name": "account", "type": "address"},
    {"name": "token", "type": "address"},
    {"name": "cumulativeAmount", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
)
DOMAIN_FIELDS: tuple[dict[str, str], ...] = (
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
)
BODY_FIELDS = ("cumulativeAmount", "deadline", "signature")

EIP712_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
DEBIT_VOUCHER_TYPEHASH = keccak(
    text="DebitVoucher(address account,address token,uint256 cumulativeAmount,uint256 deadline)"
)

# Limits on what comes from outside.
BODY_BYTES_MAX = 4096
# The column is a BIGINT; no real debt comes near it.
CUMULATIVE_MICROS_MAX = 2**63 - 1
CUMULATIVE_DIGITS_MAX = 19
# A voucher that expires sooner could not be collected before it lapses.
DEADLINE_LIFETIME_MIN_S = 600
# Farther deadlines are refused: session keys' own policies are far shorter, and a bound
# keeps the value a sane timestamp.
DEADLINE_LIFETIME_MAX_S = 400 * 86_400
SIGNATURE_PATTERN = re.compile(r"0x[0-9a-fA-F]{130}")


@dataclass(frozen=True, slots=True)
class VoucherDomain:
    """Where vouchers are valid: one settlement contract on one chain, for one token."""

    chain_id: int
    settlement: str
    token: str

    def separator(self) -> bytes:
        return keccak(abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [EIP712_DOMAIN_TYPEHASH, keccak(text=DOMAIN_NAME), keccak(text=DOMAIN_VERSION),
             self.chain_id, to_checksum_address(self.settlement)],
        ))

    def digest(self, account: str, cumulative_micros: int, deadline_s: int) -> bytes:
        """The contract's ``voucherDigest(account, cumulativeAmount, deadline)``."""
        struct_hash = keccak(abi_encode(
            ["bytes32", "address", "address", "uint256", "uint256"],
            [DEBIT_VOUCHER_TYPEHASH, to_checksum_address(account),
             to_checksum_address(self.token), cumulative_micros, deadline_s],
        ))
        return keccak(b"\x19\x01" + self.separator() + struct_hash)

    def eip712_domain(self) -> dict[str, object]:
        return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": self.chain_id,
                "verifyingContract": to_checksum_address(self.settlement)}


def schema_document(domain: VoucherDomain) -> dict[str, object]:
    """What ``GET /v1/vouchers/schema`` answers: everything an agent needs to sign."""
    return {
        "object": "voucher.schema",
        "primaryType": PRIMARY_TYPE,
        "types": {"EIP712Domain": [dict(f) for f in DOMAIN_FIELDS],
                  PRIMARY_TYPE: [dict(f) for f in VOUCHER_FIELDS]},
        "domain": domain.eip712_domain(),
        "message": {
            "account": "the session's smart account",
            "token": to_checksum_address(domain.token),
            "cumulativeAmount": "the total (micro-USD = token base units) that may ever be"
                                " collected under this key, including what was collected",
            "deadline": "unix seconds; the voucher is valid while block.timestamp <= deadline",
        },
        "signer": "the session's session key (65-byte ECDSA, low s, v 27/28 or 0/1)",
        "body": {
            "cumulativeAmount": "decimal string of micro-USD",
            "deadline": "integer, unix seconds",
            "signature": "0x-prefixed hex of r || s || v (130 hex digits)",
        },
        "limits": {
            "body_bytes_max": BODY_BYTES_MAX,
            "cumulative_micros_max": str(CUMULATIVE_MICROS_MAX),
            "deadline_lifetime_min_s": DEADLINE_LIFETIME_MIN_S,
            "deadline_lifetime_max_s": DEADLINE_LIFETIME_MAX_S,
            "rule": "a voucher lower than the stored one for the same key is refused",
        },
    }


@dataclass(frozen=True, slots=True)
class SignedVoucher:
    """A voucher as posted: not yet checked against any key."""

    cumulative_micros: int
    deadline_s: int
    signature: bytes  # 65 bytes, v normalized to 27/28

    def __post_init__(self) -> None:
        assert 0 < self.cumulative_micros <= CUMULATIVE_MICROS_MAX
        assert len(self.signature) == 65 and self.signature[64] in (27, 28)


def parse_voucher(body: object, now_s: int) -> SignedVoucher:
    """The voucher from the decoded JSON body, or ``InvalidRequest`` naming the bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_body")
    for name in body:
        if name not in BODY_FIELDS:
            raise InvalidRequest(f"unknown field {str(name)[:64]!r}", param=str(name)[:64],
                                 code="unknown_parameter")
    for name in BODY_FIELDS:
        if name not in body:
            raise InvalidRequest(f"{name} is required", param=name, code="missing_parameter")
    return SignedVoucher(
        cumulative_micros=_cumulative(body["cumulativeAmount"]),
        deadline_s=_deadline(body["deadline"], now_s),
        signature=_signature(body["signature"]),
    )


def _cumulative(value: object) -> int:
    # A string, as every amount in the API: JSON numbers lose precision in many clients.
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() \
            or len(value) > CUMULATIVE_DIGITS_MAX:
        raise InvalidRequest("cumulativeAmount must be a decimal string of micro-USD",
                             param="cumulativeAmount", code="invalid_amount")
    amount = int(value)
    if not 0 < amount <= CUMULATIVE_MICROS_MAX:
        raise InvalidRequest(f"cumulativeAmount must be between 1 and {CUMULATIVE_MICROS_MAX}",
                             param="cumulativeAmount", code="invalid_amount")
    return amount


def _deadline(value: object, now_s: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("deadline must be an integer (unix seconds)", param="deadline",
                             code="invalid_type")
    if value < now_s + DEADLINE_LIFETIME_MIN_S:
        raise InvalidRequest(
            f"deadline must be at least {DEADLINE_LIFETIME_MIN_S} s in the future",
            param="deadline", code="voucher_expires_too_soon")
    if value > now_s + DEADLINE_LIFETIME_MAX_S:
        raise InvalidRequest(
            f"deadline must be at most {DEADLINE_LIFETIME_MAX_S} s in the future",
            param="deadline", code="voucher_deadline_too_far")
    return value


def _signature(value: object) -> bytes:
    if not isinstance(value, str) or not SIGNATURE_PATTERN.fullmatch(value):
        raise InvalidRequest("signature must be 0x-prefixed hex of the 65-byte r || s || v",
                             param="signature", code="malformed_signature")
    raw = bytearray(bytes.fromhex(value[2:]))
    if raw[64] in (0, 1):
        raw[64] += 27
    if raw[64] not in (27, 28):
        raise InvalidRequest("the signature's v must be 27, 28, 0 or 1", param="signature",
                             code="malformed_signature")
    return bytes(raw)


def check_signer(domain: VoucherDomain, voucher: SignedVoucher, *, account: str,
                 session_key: str) -> None:
    """Refuse a voucher that is not ``session_key``'s signature for ``account``."""
    digest = domain.digest(account, voucher.cumulative_micros, voucher.deadline_s)
    signer = recover_eoa(digest, voucher.signature)
    if signer is None or signer.lower() != session_key.lower():
        raise InvalidRequest(
            "the signature is not this session's key signing a DebitVoucher for this"
            " session's account (see GET /v1/vouchers/schema)",
            param="signature", code="invalid_voucher_signature")


@dataclass(frozen=True, slots=True)
class StoredVoucher:
    """The best voucher of one session key, as the worker uses it."""

    account_id: int
    session_key: str
    cumulative_micros: int
    deadline_s: int
    signature: bytes
    updated_at: dt.datetime

    def body(self, domain: VoucherDomain) -> dict[str, object]:
        return {
            "object": "voucher",
            "account_id": f"acct_{self.account_id}",
            "session_key": self.session_key,
            "settlement": domain.settlement.lower(),
            "chain_id": domain.chain_id,
            "cumulative_amount": str(self.cumulative_micros),
            "deadline": self.deadline_s,
            "updated_at": int(self.updated_at.timestamp()),
        }


# One statement decides and writes, so two concurrent posts cannot both "win" with the
# lower one last.
_SAVE = text(f"""
INSERT INTO {vouchers.name} AS stored
    (account_id, session_key, settlement, chain_id, cumulative_micros, deadline, signature)
VALUES (:account_id, :session_key, :settlement, :chain_id, :cumulative, :deadline, :signature)
ON CONFLICT (account_id, session_key, settlement) DO UPDATE
SET cumulative_micros = excluded.cumulative_micros, deadline = excluded.deadline,
    signature = excluded.signature, updated_at = now()
WHERE stored.cumulative_micros < excluded.cumulative_micros
   OR (stored.cumulative_micros = excluded.cumulative_micros
       AND stored.deadline <= excluded.deadline)
RETURNING account_id, session_key, cumulative_micros, deadline, signature, updated_at
""")

_READ = text(f"""
SELECT account_id, session_key, cumulative_micros, deadline, signature, updated_at
FROM {vouchers.name}
WHERE account_id = :account_id AND session_key = :session_key AND settlement = :settlement
""")

# The vouchers the worker may use: live for at least a margin, the highest first.
_USABLE = text(f"""
SELECT account_id, session_key, cumulative_micros, deadline, signature, updated_at
FROM {vouchers.name}
WHERE account_id = :account_id AND settlement = :settlement
  AND deadline > :usable_after
ORDER BY cumulative_micros DESC, session_key
LIMIT :limit
""")


def _time(unix_s: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC)


def _stored(row: object) -> StoredVoucher:
    mapping = row._mapping  # type: ignore[attr-defined]
    return StoredVoucher(
        account_id=mapping["account_id"], session_key=mapping["session_key"],
        cumulative_micros=mapping["cumulative_micros"],
        deadline_s=int(mapping["deadline"].timestamp()),
        signature=bytes.fromhex(mapping["signature"][2:]), updated_at=mapping["updated_at"],
    )


class VoucherStore:
    """The ``vouchers`` rows of one settlement contract."""

    def __init__(self, engine: AsyncEngine, domain: VoucherDomain) -> None:
        self.engine = engine
        self.domain = domain

    async def save(self, account_id: int, session_key: str, voucher: SignedVoucher
                   ) -> StoredVoucher:
        """Store ``voucher`` unless a higher one is stored; ``InvalidRequest`` if it is."""
        key = session_key.lower()
        async with self.engine.begin() as connection:
            row = (await connection.execute(_SAVE, {
                "account_id": account_id, "session_key": key,
                "settlement": self.domain.settlement.lower(), "chain_id": self.domain.chain_id,
                "cumulative": voucher.cumulative_micros, "deadline": _time(voucher.deadline_s),
                "signature": "0x" + voucher.signature.hex(),
            })).first()
            if row is not None:
                return _stored(row)
            stored = _stored((await connection.execute(_READ, {
                "account_id": account_id, "session_key": key,
                "settlement": self.domain.settlement.lower()})).one())
        raise InvalidRequest(
            f"a voucher for {stored.cumulative_micros} micro-USD (deadline"
            f" {stored.deadline_s}) is already stored for this key; post one that is not lower",
            param="cumulativeAmount", code="voucher_not_increasing")

    async def usable(self, connection: AsyncConnection, account_id: int, *,
                     usable_after_s: int, limit: int) -> list[StoredVoucher]:
        """The account's vouchers still valid after ``usable_after_s``, highest first."""
        rows = await connection.execute(_USABLE, {
            "account_id": account_id, "settlement": self.domain.settlement.lower(),
            "usable_after": _time(usable_after_s), "limit": limit})
        return [_stored(row) for row in rows]

    async def for_key(self, connection: AsyncConnection, account_id: int, session_key: str
                      ) -> StoredVoucher | None:
        """The stored voucher of one key (whatever its deadline)."""
        row = (await connection.execute(_READ, {
            "account_id": account_id, "session_key": session_key.lower(),
            "settlement": self.domain.settlement.lower()})).first()
        return None if row is None else _stored(row)
