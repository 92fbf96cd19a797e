"""TollgateAccount and TollgateAccountFactory: CREATE2 addresses, execution, ERC-4337 validation
and replay-safe ERC-1271 signatures."""

from __future__ import annotations

import secrets

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_utils import keccak, to_checksum_address

from .conftest import (
    ETHER,
    INVALID_1271,
    MAGIC_1271,
    USDC,
    Deployment,
    event_args,
    load_artifact,
    policy,
    reverts,
    sign_1271,
    sign_eth_message,
    sign_raw,
)

SIG_VALIDATION_FAILED = 1


def user_op(sender: str, signature: bytes, call_data: bytes = b"") -> tuple:
    """A v0.7 PackedUserOperation tuple; only `signature` matters to the account."""
    gas_limits = (100_000 << 128 | 200_000).to_bytes(32)
    gas_fees = (10**9 << 128 | 10**9).to_bytes(32)
    return (sender, 0, b"", call_data, gas_limits, 50_000, gas_fees, b"", signature)


def create2_address(factory: str, salt: int, entry_point: str, owner: str) -> str:
    init_code = bytes.fromhex(load_artifact("TollgateAccount")["bytecode"][2:]) + abi_encode(
        ["address", "address"], [entry_point, owner]
    )
    raw = keccak(b"\xff" + bytes.fromhex(factory[2:]) + salt.to_bytes(32) + keccak(init_code))
    return to_checksum_address(raw[12:])


# ------------------------------------------------------------------------------- factory


def test_factory_counterfactual_address_and_idempotent_create(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    factory = dep.factory
    predicted = factory.functions.getAddress(a.alice.address, 7).call()
    assert predicted == create2_address(factory.address, 7, a.entry_point.address, a.alice.address)
    assert dep.chain.w3.eth.get_code(predicted) == b""
    # different owner or salt -> different address
    assert factory.functions.getAddress(a.bob.address, 7).call() != predicted
    assert factory.functions.getAddress(a.alice.address, 8).call() != predicted

    receipt = dep.chain.send(
        factory.functions.createAccount(a.alice.address, 7),
        a.carol,
        label="factory createAccount (deploy)",
    )
    created = event_args(factory, receipt, "AccountCreated")
    assert [(e["account"], e["owner"], e["salt"]) for e in created] == [
        (predicted, a.alice.address, 7)
    ]
    account = dep.chain.contract("TollgateAccount", predicted)
    assert account.functions.owner().call() == a.alice.address
    assert account.functions.entryPoint().call() == a.entry_point.address
    assert factory.functions.entryPoint().call() == a.entry_point.address

    # a second create returns the same account and deploys nothing
    assert factory.functions.createAccount(a.alice.address, 7).call() == predicted
    again = dep.chain.send(
        factory.functions.createAccount(a.alice.address, 7),
        a.carol,
        label="factory createAccount (existing)",
    )
    assert event_args(factory, again, "AccountCreated") == []


# ------------------------------------------------------------------------------- execution


def test_owner_execute_and_batch(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    w3 = dep.chain.w3
    account = dep.create_account(a.alice)
    dep.mint(account.address, 10 * USDC)
    w3.eth.send_transaction({"from": a.bob.address, "to": account.address, "value": ETHER})

    transfer = dep.usdc.encode_abi("transfer", args=[a.bob.address, 2 * USDC])
    dep.chain.send(
        account.functions.execute(dep.usdc.address, 0, transfer),
        a.alice,
        label="account execute (USDC transfer)",
    )
    assert dep.usdc.functions.balanceOf(a.bob.address).call() == 2 * USDC

    before = w3.eth.get_balance(a.carol.address)
    dep.chain.send(account.functions.execute(a.carol.address, ETHER // 2, b""), a.alice)
    assert w3.eth.get_balance(a.carol.address) == before + ETHER // 2

    calls = [
        dep.usdc.encode_abi("transfer", args=[a.bob.address, USDC]),
        dep.usdc.encode_abi("transfer", args=[a.carol.address, USDC]),
    ]
    dep.chain.send(
        account.functions.executeBatch([dep.usdc.address] * 2, [], calls),
        a.alice,
        label="account executeBatch (2 USDC transfers)",
    )
    dep.chain.send(
        account.functions.executeBatch(
            [dep.usdc.address, a.carol.address], [0, 1], [calls[0], b""]
        ),
        a.alice,
    )
    assert dep.usdc.functions.balanceOf(a.bob.address).call() == 4 * USDC
    assert dep.usdc.functions.balanceOf(a.carol.address).call() == USDC

    # the EntryPoint may execute too
    dep.chain.send(account.functions.execute(dep.usdc.address, 0, transfer), a.entry_point)
    assert dep.usdc.functions.balanceOf(a.bob.address).call() == 6 * USDC


def test_execute_refusals(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    dep.mint(account.address, USDC)
    steal = dep.usdc.encode_abi("transfer", args=[a.mallory.address, USDC])
    with reverts("NotOwnerOrEntryPoint"):
        dep.chain.send(account.functions.execute(dep.usdc.address, 0, steal), a.mallory)
    with reverts("NotOwnerOrEntryPoint"):
        dep.chain.send(account.functions.executeBatch([dep.usdc.address], [], [steal]), a.mallory)
    with reverts("BatchLengthMismatch"):
        dep.chain.send(account.functions.executeBatch([dep.usdc.address], [], []), a.alice)
    with reverts("BatchLengthMismatch"):
        dep.chain.send(account.functions.executeBatch([dep.usdc.address], [0, 0], [steal]), a.alice)
    # a failing inner call's revert data is bubbled up unchanged
    too_much = dep.usdc.encode_abi("transfer", args=[a.bob.address, 2 * USDC])
    with reverts("InsufficientBalance", USDC, 2 * USDC):
        dep.chain.send(account.functions.execute(dep.usdc.address, 0, too_much), a.alice)


# ------------------------------------------------------------------------------- ERC-4337


def test_validate_user_op(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    w3 = dep.chain.w3
    account = dep.create_account(a.alice)
    op_hash = secrets.token_bytes(32)

    good = user_op(account.address, sign_eth_message(a.alice, op_hash))
    validate = account.functions.validateUserOp
    assert validate(good, op_hash, 0).call({"from": a.entry_point.address}) == 0

    bad_signer = user_op(account.address, sign_eth_message(a.mallory, op_hash))
    assert validate(bad_signer, op_hash, 0).call({"from": a.entry_point.address}) == 1
    other_hash = secrets.token_bytes(32)
    assert validate(good, other_hash, 0).call({"from": a.entry_point.address}) == 1
    raw = user_op(account.address, sign_raw(a.alice, op_hash))  # not eth_sign-wrapped
    assert validate(raw, op_hash, 0).call({"from": a.entry_point.address}) == 1
    garbage = user_op(account.address, b"\x01" * 30)
    assert validate(garbage, op_hash, 0).call({"from": a.entry_point.address}) == 1

    # only the EntryPoint given at construction may call it
    for caller in (a.alice, a.mallory):
        with reverts("NotEntryPoint"):
            dep.chain.send(validate(good, op_hash, 0), caller)

    # pays the missing funds to the EntryPoint
    w3.eth.send_transaction({"from": a.bob.address, "to": account.address, "value": ETHER})
    missing = 12345
    dep.chain.send(validate(good, op_hash, 0), a.entry_point, label="account validateUserOp")
    dep.chain.send(
        validate(good, op_hash, missing),
        a.entry_point,
        label="account validateUserOp (+ prefund)",
    )
    assert w3.eth.get_balance(account.address) == ETHER - missing


def test_validate_user_op_time_bounds(deployment: Deployment) -> None:
    """The 77-byte signature form binds validUntil/validAfter and returns them packed."""
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    op_hash = secrets.token_bytes(32)
    valid_until, valid_after = 2_000_000_000, 1_700_000_000
    bounded = keccak(
        abi_encode(["bytes32", "uint48", "uint48"], [op_hash, valid_until, valid_after])
    )
    prefix = valid_until.to_bytes(6) + valid_after.to_bytes(6)
    signature = prefix + sign_eth_message(a.alice, bounded)
    result = account.functions.validateUserOp(user_op(account.address, signature), op_hash, 0).call(
        {"from": a.entry_point.address}
    )
    assert result == valid_until << 160 | valid_after << 208
    assert result & 1 == 0

    # changing the bounds invalidates the signature
    stretched = (valid_until + 1).to_bytes(6) + signature[6:]
    assert (
        account.functions.validateUserOp(user_op(account.address, stretched), op_hash, 0).call(
            {"from": a.entry_point.address}
        )
        == SIG_VALIDATION_FAILED
    )


# ------------------------------------------------------------------------------- ERC-1271


def test_erc1271_wrapped_ok_unwrapped_refused(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    message_hash = keccak(text="sign in to tollgate")
    wrapped = sign_1271(dep.chain, a.alice, account.address, message_hash)

    # the Python EIP-712 encoding matches the contract's
    expected_digest = Account.sign_typed_data(
        a.alice.key,
        {
            "name": "TollgateAccount",
            "version": "1",
            "chainId": dep.chain.chain_id,
            "verifyingContract": account.address,
        },
        {"TollgateMessage": [{"name": "hash", "type": "bytes32"}]},
        {"hash": message_hash},
    ).message_hash
    assert account.functions.replaySafeHash(message_hash).call() == expected_digest
    assert account.functions.TOLLGATE_MESSAGE_TYPEHASH().call() == keccak(
        text="TollgateMessage(bytes32 hash)"
    )

    is_valid = account.functions.isValidSignature
    assert is_valid(message_hash, wrapped).call() == MAGIC_1271
    assert is_valid(message_hash, sign_raw(a.alice, message_hash)).call() == INVALID_1271
    assert is_valid(message_hash, sign_eth_message(a.alice, message_hash)).call() == INVALID_1271
    assert is_valid(keccak(text="other"), wrapped).call() == INVALID_1271
    stranger = sign_1271(dep.chain, a.mallory, account.address, message_hash)
    assert is_valid(message_hash, stranger).call() == INVALID_1271
    assert is_valid(message_hash, b"").call() == INVALID_1271
    assert is_valid(message_hash, wrapped[:64]).call() == INVALID_1271


def test_erc1271_replay_on_another_account_of_same_owner_refused(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    first = dep.create_account(a.alice, salt=0)
    second = dep.create_account(a.alice, salt=1)
    assert first.address != second.address
    message_hash = keccak(text="pay 5 USDC")
    for_first = sign_1271(dep.chain, a.alice, first.address, message_hash)
    assert first.functions.isValidSignature(message_hash, for_first).call() == MAGIC_1271
    assert second.functions.isValidSignature(message_hash, for_first).call() == INVALID_1271


def test_erc1271_session_keys_only_through_is_valid_session_signature(
    deployment: Deployment,
) -> None:
    """A session key's (wrapped) signature is not an ERC-1271 signature of the account: it would
    otherwise authorize EIP-3009 transfers or permits beyond the session policy. It is accepted
    by isValidSessionSignature while the key is live."""
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    valid_until = dep.chain.next_timestamp() + 3600
    dep.chain.send(
        account.functions.grantSessionKey(
            a.session.address,
            policy(dep.usdc.address, dep.settlement.address, 5 * USDC, 86400, valid_until),
        ),
        a.alice,
    )
    message_hash = keccak(text="login nonce 42")
    by_session = sign_1271(dep.chain, a.session, account.address, message_hash)
    by_owner = sign_1271(dep.chain, a.alice, account.address, message_hash)
    assert account.functions.isValidSignature(message_hash, by_session).call() == INVALID_1271
    session_check = account.functions.isValidSessionSignature
    assert session_check(message_hash, by_session).call() == MAGIC_1271
    assert session_check(message_hash, by_owner).call() == MAGIC_1271
    assert session_check(message_hash, sign_raw(a.session, message_hash)).call() == INVALID_1271
    by_stranger = sign_1271(dep.chain, a.mallory, account.address, message_hash)
    assert session_check(message_hash, by_stranger).call() == INVALID_1271

    dep.chain.send(account.functions.revokeSessionKey(a.session.address), a.alice)
    assert session_check(message_hash, by_session).call() == INVALID_1271
