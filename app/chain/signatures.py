"""Signature verification for EOAs, deployed smart accounts (ERC-1271) and undeployed
TollgateAccounts (ERC-6492), without sending a transaction.

``verify_signature`` answers ``False`` for every bad signature and raises only ``ChainError``
when the chain cannot be asked, so callers can tell "refused" from "cannot check now".

ERC-6492 is verified specifically for ``TollgateAccountFactory`` accounts. The general method
(an ``eth_call`` that deploys the account through the factory and calls ``isValidSignature`` in
one simulated transaction) needs either state overrides or a helper validator contract, neither
of which the committed contracts or eth-tester provide. Instead, for an undeployed signer:

1. the factory must be in the caller's allowlist (only factories known to deploy
   TollgateAccounts, whose ``isValidSignature`` rule is reproduced below);
2. the factory calldata must be ``createAccount(owner, salt)``, and the factory's own
   ``getAddress(owner, salt)`` (an ``eth_call``) must be the signer, so the signature is bound
   to the exact account the factory would deploy;
3. the inner signature must be `owner`'s ECDSA signature over the account's ERC-1271 digest:
   EIP-712 ``TollgateMessage(bytes32 hash)`` in the domain ("TollgateAccount", "1", chain id,
   verifyingContract = the counterfactual address), which is what the deployed account would
   check (``replaySafeHash``). A wrapper from any other factory is refused.

A 6492-wrapped signature for an account that is already deployed is checked through ERC-1271
with the inner signature, as the standard says; the factory is then not involved.
"""

from __future__ import annotations

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_keys import keys
from eth_keys.exceptions import BadSignature, ValidationError
from eth_utils import is_address, keccak, to_checksum_address

from app.chain.client import ChainClient
from app.chain.errors import TransactionReverted

ERC1271_MAGIC = bytes.fromhex("1626ba7e")
ERC6492_SUFFIX = bytes.fromhex("6492" * 16)
IS_VALID_SIGNATURE_SELECTOR = keccak(text="isValidSignature(bytes32,bytes)")[:4]
CREATE_ACCOUNT_SELECTOR = keccak(text="createAccount(address,uint256)")[:4]
GET_ADDRESS_SELECTOR = keccak(text="getAddress(address,uint256)")[:4]
# secp256k1 group order; signatures with s above half of it are malleable twins and refused.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
ECDSA_SIGNATURE_LENGTH = 65
# Bounds what an outside caller can make us decode and send to a node.
SIGNATURE_LENGTH_MAX = 16_384

EIP712_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TOLLGATE_MESSAGE_TYPEHASH = keccak(text="TollgateMessage(bytes32 hash)")


async def verify_signature(
    client: ChainClient,
    signer: str,
    digest: bytes,
    signature: bytes,
    *,
    factory_allowlist: set[str],
) -> bool:
    """Whether `signature` is `signer`'s signature of the 32-byte `digest`."""
    if not is_address(signer) or len(digest) != 32 or len(signature) > SIGNATURE_LENGTH_MAX:
        return False
    signer = to_checksum_address(signer)
    if signature.endswith(ERC6492_SUFFIX):
        return await _verify_erc6492(client, signer, digest, signature, factory_allowlist)
    if await client.code_at(signer):
        return await _verify_erc1271(client, signer, digest, signature)
    return recover_eoa(digest, signature) == signer


def recover_eoa(digest: bytes, signature: bytes) -> str | None:
    """The address whose key made the 65-byte (r, s, v) `signature` of `digest`, or ``None``
    for a malformed or malleable (high-s) signature. v may be 27/28 or 0/1."""
    if len(digest) != 32 or len(signature) != ECDSA_SIGNATURE_LENGTH:
        return None
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    v = signature[64]
    if v in (27, 28):
        v -= 27
    if v not in (0, 1) or not 0 < r < SECP256K1_N or not 0 < s <= SECP256K1_N // 2:
        return None
    try:
        public_key = keys.Signature(vrs=(v, r, s)).recover_public_key_from_msg_hash(digest)
    except (BadSignature, ValidationError):
        return None
    return str(public_key.to_checksum_address())


async def _verify_erc1271(
    client: ChainClient, account: str, digest: bytes, signature: bytes
) -> bool:
    data = IS_VALID_SIGNATURE_SELECTOR + abi_encode(["bytes32", "bytes"], [digest, signature])
    try:
        result = await client.call({"to": account, "data": data})
    except TransactionReverted:
        return False
    # The answer is a bytes4 left-aligned in one 32-byte word; anything else is a refusal.
    return len(result) == 32 and result == ERC1271_MAGIC.ljust(32, b"\0")


async def _verify_erc6492(
    client: ChainClient,
    signer: str,
    digest: bytes,
    signature: bytes,
    factory_allowlist: set[str],
) -> bool:
    try:
        factory, calldata, inner = abi_decode(
            ["address", "bytes", "bytes"], signature[: -len(ERC6492_SUFFIX)]
        )
    except Exception:  # eth_abi raises several unrelated types for malformed input
        return False
    if await client.code_at(signer):
        return await _verify_erc1271(client, signer, digest, inner)
    allowed = {to_checksum_address(a) for a in factory_allowlist if is_address(a)}
    if to_checksum_address(factory) not in allowed or calldata[:4] != CREATE_ACCOUNT_SELECTOR:
        return False
    try:
        owner, salt = abi_decode(["address", "uint256"], calldata[4:])
    except Exception:
        return False
    if await _counterfactual_address(client, factory, owner, salt) != signer:
        return False
    wrapped = tollgate_message_digest(client.chain_id, signer, digest)
    return recover_eoa(wrapped, inner) == to_checksum_address(owner)


async def _counterfactual_address(
    client: ChainClient, factory: str, owner: str, salt: int
) -> str | None:
    data = GET_ADDRESS_SELECTOR + abi_encode(["address", "uint256"], [owner, salt])
    try:
        result = await client.call({"to": to_checksum_address(factory), "data": data})
    except TransactionReverted:
        return None
    if len(result) != 32:
        return None
    return to_checksum_address(result[12:])


def tollgate_message_digest(chain_id: int, account: str, hash_: bytes) -> bytes:
    """The digest a TollgateAccount's owner signs for ERC-1271 (``replaySafeHash(hash_)``):
    EIP-712 ``TollgateMessage(bytes32 hash)`` in the domain of the account at `account`."""
    domain_separator = keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                EIP712_DOMAIN_TYPEHASH,
                keccak(text="TollgateAccount"),
                keccak(text="1"),
                chain_id,
                to_checksum_address(account),
            ],
        )
    )
    struct_hash = keccak(abi_encode(["bytes32", "bytes32"], [TOLLGATE_MESSAGE_TYPEHASH, hash_]))
    return keccak(b"\x19\x01" + domain_separator + struct_hash)
