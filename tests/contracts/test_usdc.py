"""TestUSDC: ERC-20 basics and EIP-3009 with both signature forms, including ERC-1271 wallets."""

from __future__ import annotations

from eth_abi import encode as abi_encode
from eth_utils import keccak

from .conftest import (
    USDC,
    Deployment,
    authorization,
    event_args,
    random_nonce,
    reverts,
    sign_1271,
    sign_raw,
    sign_typed,
    usdc_domain,
)

TRANSFER_TYPE = (
    "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    "uint256 validBefore,bytes32 nonce)"
)
RECEIVE_TYPE = (
    "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    "uint256 validBefore,bytes32 nonce)"
)
CANCEL_TYPE = "CancelAuthorization(address authorizer,bytes32 nonce)"


AUTH_HEAD = "address,address,uint256,uint256,uint256,bytes32"


def _transfer(usdc, auth, *, bytes_form: bool):
    tail = "bytes" if bytes_form else "uint8,bytes32,bytes32"
    fn = usdc.get_function_by_signature(f"transferWithAuthorization({AUTH_HEAD},{tail})")
    return fn(*auth.args, auth.signature) if bytes_form else fn(*auth.args, *auth.vrs)


def _receive(usdc, auth, *, bytes_form: bool):
    tail = "bytes" if bytes_form else "uint8,bytes32,bytes32"
    fn = usdc.get_function_by_signature(f"receiveWithAuthorization({AUTH_HEAD},{tail})")
    return fn(*auth.args, auth.signature) if bytes_form else fn(*auth.args, *auth.vrs)


def _cancel_signature(dep: Deployment, signer, authorizer: str, nonce: bytes):
    return sign_typed(
        signer,
        usdc_domain(dep.chain, dep.usdc),
        {
            "CancelAuthorization": [
                {"name": "authorizer", "type": "address"},
                {"name": "nonce", "type": "bytes32"},
            ]
        },
        {"authorizer": authorizer, "nonce": nonce},
    )


def test_metadata_and_domain(deployment: Deployment) -> None:
    usdc = deployment.usdc
    assert usdc.functions.name().call() == "USD Coin"
    assert usdc.functions.symbol().call() == "USDC"
    assert usdc.functions.decimals().call() == 6
    assert usdc.functions.version().call() == "2"
    assert usdc.functions.TRANSFER_WITH_AUTHORIZATION_TYPEHASH().call() == keccak(
        text=TRANSFER_TYPE
    )
    assert usdc.functions.RECEIVE_WITH_AUTHORIZATION_TYPEHASH().call() == keccak(text=RECEIVE_TYPE)
    assert usdc.functions.CANCEL_AUTHORIZATION_TYPEHASH().call() == keccak(text=CANCEL_TYPE)
    domain_type = keccak(
        text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    )
    expected = keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                domain_type,
                keccak(text="USD Coin"),
                keccak(text="2"),
                deployment.chain.chain_id,
                usdc.address,
            ],
        )
    )
    assert usdc.functions.DOMAIN_SEPARATOR().call() == expected


def test_mint_owner_only_and_erc20(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    usdc = dep.usdc
    dep.chain.send(usdc.functions.mint(a.bob.address, 10 * USDC), a.deployer, label="usdc mint")
    assert usdc.functions.balanceOf(a.bob.address).call() == 10 * USDC
    assert usdc.functions.totalSupply().call() == 10 * USDC
    with reverts("NotOwner"):
        dep.chain.send(usdc.functions.mint(a.mallory.address, 1), a.mallory)

    dep.chain.send(usdc.functions.transfer(a.carol.address, 3 * USDC), a.bob, label="usdc transfer")
    with reverts("InsufficientBalance", 3 * USDC, 4 * USDC):
        dep.chain.send(usdc.functions.transfer(a.bob.address, 4 * USDC), a.carol)
    dep.chain.send(usdc.functions.approve(a.carol.address, 2 * USDC), a.bob)
    dep.chain.send(usdc.functions.transferFrom(a.bob.address, a.carol.address, 2 * USDC), a.carol)
    with reverts("InsufficientAllowance", 0, 1):
        dep.chain.send(usdc.functions.transferFrom(a.bob.address, a.carol.address, 1), a.carol)
    assert usdc.functions.balanceOf(a.bob.address).call() == 5 * USDC
    assert usdc.functions.balanceOf(a.carol.address).call() == 5 * USDC


def test_transfer_with_authorization_both_forms(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    usdc = dep.usdc
    dep.mint(a.alice.address, 10 * USDC)
    dep.mint(a.bob.address, 1)  # so both forms pay the same (non-zero to non-zero) storage cost
    for bytes_form in (False, True):
        auth = authorization(dep, a.alice, a.alice.address, a.bob.address, 2 * USDC)
        label = f"usdc transferWithAuthorization ({'bytes' if bytes_form else 'v,r,s'})"
        # anyone (here carol) may submit a transferWithAuthorization
        receipt = dep.chain.send(_transfer(usdc, auth, bytes_form=bytes_form), a.carol, label)
        assert usdc.functions.authorizationState(a.alice.address, auth.nonce).call()
        used = event_args(usdc, receipt, "AuthorizationUsed")
        assert [(e["authorizer"], e["nonce"]) for e in used] == [(a.alice.address, auth.nonce)]
    assert usdc.functions.balanceOf(a.bob.address).call() == 4 * USDC + 1
    assert usdc.functions.balanceOf(a.alice.address).call() == 6 * USDC


def test_receive_with_authorization_both_forms(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    usdc = dep.usdc
    dep.mint(a.alice.address, 10 * USDC)
    dep.mint(a.bob.address, 1)
    for bytes_form in (False, True):
        auth = authorization(
            dep, a.alice, a.alice.address, a.bob.address, USDC, kind="ReceiveWithAuthorization"
        )
        # only the payee may submit it: no front-running by a third party
        with reverts("CallerMustBePayee"):
            dep.chain.send(_receive(usdc, auth, bytes_form=bytes_form), a.mallory)
        label = f"usdc receiveWithAuthorization ({'bytes' if bytes_form else 'v,r,s'})"
        dep.chain.send(_receive(usdc, auth, bytes_form=bytes_form), a.bob, label)
    assert usdc.functions.balanceOf(a.bob.address).call() == 2 * USDC + 1


def test_receive_type_is_not_a_transfer_type(deployment: Deployment) -> None:
    """A ReceiveWithAuthorization signature cannot be used with transferWithAuthorization."""
    dep, a = deployment, deployment.actors
    dep.mint(a.alice.address, USDC)
    auth = authorization(
        dep, a.alice, a.alice.address, a.bob.address, USDC, kind="ReceiveWithAuthorization"
    )
    with reverts("InvalidSignature"):
        dep.chain.send(_transfer(dep.usdc, auth, bytes_form=False), a.mallory)


def test_replayed_nonce_refused(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    dep.mint(a.alice.address, 10 * USDC)
    auth = authorization(dep, a.alice, a.alice.address, a.bob.address, USDC)
    dep.chain.send(_transfer(dep.usdc, auth, bytes_form=False), a.bob)
    for bytes_form in (False, True):
        with reverts("AuthorizationUsedOrCanceled"):
            dep.chain.send(_transfer(dep.usdc, auth, bytes_form=bytes_form), a.bob)


def test_expired_and_not_yet_valid(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    dep.mint(a.alice.address, 10 * USDC)
    t = dep.chain.next_timestamp()
    expired = authorization(dep, a.alice, a.alice.address, a.bob.address, USDC, valid_before=t - 1)
    with reverts("AuthorizationExpired"):
        dep.chain.send(_transfer(dep.usdc, expired, bytes_form=True), a.bob)
    future = authorization(
        dep,
        a.alice,
        a.alice.address,
        a.bob.address,
        USDC,
        valid_after=t + 100,
        valid_before=t + 1000,
    )
    with reverts("AuthorizationNotYetValid"):
        dep.chain.send(_transfer(dep.usdc, future, bytes_form=False), a.bob)
    dep.chain.advance(200)
    dep.chain.send(_transfer(dep.usdc, future, bytes_form=False), a.bob)
    assert dep.usdc.functions.balanceOf(a.bob.address).call() == USDC


def test_wrong_signer_and_tampered_message_refused(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    dep.mint(a.alice.address, 10 * USDC)
    forged = authorization(dep, a.mallory, a.alice.address, a.mallory.address, USDC)
    for bytes_form in (False, True):
        with reverts("InvalidSignature"):
            dep.chain.send(_transfer(dep.usdc, forged, bytes_form=bytes_form), a.mallory)
    genuine = authorization(dep, a.alice, a.alice.address, a.bob.address, USDC)
    genuine.value = 5 * USDC
    with reverts("InvalidSignature"):
        dep.chain.send(_transfer(dep.usdc, genuine, bytes_form=True), a.bob)
    genuine.value = USDC
    genuine.signature = genuine.signature[:64]  # malformed length
    with reverts("InvalidSignature"):
        dep.chain.send(_transfer(dep.usdc, genuine, bytes_form=True), a.bob)


def test_high_s_signature_refused(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    dep.mint(a.alice.address, 10 * USDC)
    auth = authorization(dep, a.alice, a.alice.address, a.bob.address, USDC)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    high_s = (n - int.from_bytes(auth.s)).to_bytes(32)
    auth.v, auth.s = 55 - auth.v, high_s  # the malleable twin of the same signature
    with reverts("InvalidSignature"):
        dep.chain.send(_transfer(dep.usdc, auth, bytes_form=False), a.bob)


def test_cancel_authorization_both_forms(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    usdc = dep.usdc
    dep.mint(a.alice.address, 10 * USDC)
    for bytes_form in (False, True):
        auth = authorization(dep, a.alice, a.alice.address, a.bob.address, USDC)
        forged = _cancel_signature(dep, a.mallory, a.alice.address, auth.nonce)
        with reverts("InvalidSignature"):
            dep.chain.send(
                usdc.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")(
                    a.alice.address, auth.nonce, bytes(forged.signature)
                ),
                a.mallory,
            )
        signed = _cancel_signature(dep, a.alice, a.alice.address, auth.nonce)
        if bytes_form:
            call = usdc.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")(
                a.alice.address, auth.nonce, bytes(signed.signature)
            )
        else:
            call = usdc.get_function_by_signature(
                "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)"
            )(a.alice.address, auth.nonce, signed.v, signed.r.to_bytes(32), signed.s.to_bytes(32))
        label = f"usdc cancelAuthorization ({'bytes' if bytes_form else 'v,r,s'})"
        receipt = dep.chain.send(call, a.bob, label)
        assert len(event_args(usdc, receipt, "AuthorizationCanceled")) == 1
        assert usdc.functions.authorizationState(a.alice.address, auth.nonce).call()
        with reverts("AuthorizationUsedOrCanceled"):
            dep.chain.send(_transfer(usdc, auth, bytes_form=False), a.bob)
        with reverts("AuthorizationUsedOrCanceled"):  # cannot cancel twice either
            dep.chain.send(call, a.bob)
    assert usdc.functions.balanceOf(a.bob.address).call() == 0


def test_erc1271_smart_account_as_from(deployment: Deployment) -> None:
    """A TollgateAccount pays with EIP-3009: its owner signs the EIP-3009 digest wrapped in the
    account's own EIP-712 domain; TestUSDC checks it with isValidSignature."""
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    dep.mint(account.address, 10 * USDC)
    auth = authorization(
        dep, a.alice, account.address, a.bob.address, 3 * USDC, wrap_for_account=account
    )
    dep.chain.send(
        _transfer(dep.usdc, auth, bytes_form=True),
        a.bob,
        label="usdc transferWithAuthorization (ERC-1271 account)",
    )
    assert dep.usdc.functions.balanceOf(a.bob.address).call() == 3 * USDC

    recv = authorization(
        dep,
        a.alice,
        account.address,
        a.bob.address,
        USDC,
        kind="ReceiveWithAuthorization",
        wrap_for_account=account,
    )
    dep.chain.send(_receive(dep.usdc, recv, bytes_form=True), a.bob)
    assert dep.usdc.functions.balanceOf(account.address).call() == 6 * USDC

    # the owner's plain (unwrapped) EIP-712 signature is not accepted for the account
    plain = authorization(dep, a.alice, account.address, a.bob.address, USDC)
    with reverts("InvalidSignature"):
        dep.chain.send(_transfer(dep.usdc, plain, bytes_form=True), a.bob)
    # nor a raw signature over the digest, nor a stranger's wrapped signature
    plain.signature = sign_raw(a.alice, plain.digest)
    with reverts("InvalidSignature"):
        dep.chain.send(_transfer(dep.usdc, plain, bytes_form=True), a.bob)
    stranger = authorization(
        dep, a.mallory, account.address, a.mallory.address, USDC, wrap_for_account=account
    )
    with reverts("InvalidSignature"):
        dep.chain.send(_transfer(dep.usdc, stranger, bytes_form=True), a.mallory)


def test_erc1271_cancel_from_smart_account(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    nonce = random_nonce()
    digest = _cancel_signature(dep, a.alice, account.address, nonce).message_hash
    signature = sign_1271(dep.chain, a.alice, account.address, digest)
    dep.chain.send(
        dep.usdc.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")(
            account.address, nonce, signature
        ),
        a.bob,
    )
    assert dep.usdc.functions.authorizationState(account.address, nonce).call()
