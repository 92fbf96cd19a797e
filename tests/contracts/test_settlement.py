"""TollgateSettlement: session-key collection with cumulative vouchers, EIP-3009 settlement
(receive and transfer authorizations), one-time references, roles and sweeping."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account
from eth_utils import keccak

from .conftest import (
    METHOD_EIP3009,
    METHOD_SESSION_DEBIT,
    USDC,
    Deployment,
    authorization,
    event_args,
    policy,
    reverts,
    settlement_domain,
    sign_voucher,
)

DAY = 86_400
VRS = (
    "settleWithAuthorization(address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32,bytes32)"
)
BYTES = "settleWithAuthorization(address,uint256,uint256,uint256,bytes32,bytes,bytes32)"
TRANSFER_VRS = (
    "settleWithTransferAuthorization(address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32,"
    "bytes32)"
)
TRANSFER_BYTES = (
    "settleWithTransferAuthorization(address,uint256,uint256,uint256,bytes32,bytes,bytes32)"
)
METHOD_EIP3009_TRANSFER = 3


def ref() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def payer(deployment: Deployment):
    """Alice's smart account, funded, with a session key whose payee is the settlement."""
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    dep.mint(account.address, 100 * USDC)
    valid_until = dep.chain.next_timestamp() + 30 * DAY
    dep.chain.send(
        account.functions.grantSessionKey(
            a.session.address,
            policy(dep.usdc.address, dep.settlement.address, 10 * USDC, DAY, valid_until),
        ),
        a.alice,
    )
    return account


def _collect(
    dep: Deployment,
    account: str,
    key,
    amount,
    cumulative,
    *,
    reference=None,
    signer=None,
    deadline=None,
    sender=None,
    label="",
):
    deadline, signature = sign_voucher(dep, signer or key, account, cumulative, deadline)
    reference = reference or ref()
    receipt = dep.chain.send(
        dep.settlement.functions.collect(
            account, key.address, amount, cumulative, deadline, reference, signature
        ),
        sender or dep.actors.operator,
        label=label,
    )
    return receipt, reference


def test_voucher_digest_matches_python(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    settlement = dep.settlement
    assert settlement.functions.DEBIT_VOUCHER_TYPEHASH().call() == keccak(
        text="DebitVoucher(address account,address token,uint256 cumulativeAmount,uint256 deadline)"
    )
    signed = Account.sign_typed_data(
        a.session.key,
        settlement_domain(dep.chain, settlement),
        {
            "DebitVoucher": [
                {"name": "account", "type": "address"},
                {"name": "token", "type": "address"},
                {"name": "cumulativeAmount", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ]
        },
        {
            "account": a.bob.address,
            "token": dep.usdc.address,
            "cumulativeAmount": 5,
            "deadline": 99,
        },
    )
    assert settlement.functions.voucherDigest(a.bob.address, 5, 99).call() == signed.message_hash
    assert settlement.functions.token().call() == dep.usdc.address
    assert settlement.functions.operator().call() == a.operator.address
    assert settlement.functions.admin().call() == a.deployer.address
    assert settlement.functions.treasury().call() == a.treasury.address


def test_collect_ok_emits_settled(deployment: Deployment, payer) -> None:
    dep, a = deployment, deployment.actors
    settlement = dep.settlement
    receipt, reference = _collect(
        dep, payer.address, a.session, 3 * USDC, 3 * USDC, label="settlement collect (first)"
    )
    settled = event_args(settlement, receipt, "Settled")
    assert [(e["payer"], e["amount"], e["method"], e["ref"]) for e in settled] == [
        (payer.address, 3 * USDC, METHOD_SESSION_DEBIT, reference)
    ]
    assert settlement.functions.referenceUsed(reference).call() is True
    assert settlement.functions.collected(payer.address, a.session.address).call() == 3 * USDC
    assert dep.usdc.functions.balanceOf(settlement.address).call() == 3 * USDC
    assert dep.usdc.functions.balanceOf(payer.address).call() == 97 * USDC

    # the next voucher carries the running total; only the difference is pulled
    _collect(dep, payer.address, a.session, 2 * USDC, 5 * USDC, label="settlement collect")
    assert settlement.functions.collected(payer.address, a.session.address).call() == 5 * USDC
    assert dep.usdc.functions.balanceOf(settlement.address).call() == 5 * USDC


def test_partial_collection_of_a_voucher(deployment: Deployment, payer) -> None:
    dep, a = deployment, deployment.actors
    deadline, signature = sign_voucher(dep, a.session, payer.address, 4 * USDC)
    collect = dep.settlement.functions.collect
    for amount in (USDC, 3 * USDC):
        dep.chain.send(
            collect(payer.address, a.session.address, amount, 4 * USDC, deadline, ref(), signature),
            a.operator,
        )
    with reverts("VoucherExceeded", 4 * USDC, 4 * USDC):
        dep.chain.send(
            collect(payer.address, a.session.address, 1, 4 * USDC, deadline, ref(), signature),
            a.operator,
        )


def test_replayed_reference_refused(deployment: Deployment, payer) -> None:
    dep, a = deployment, deployment.actors
    _, reference = _collect(dep, payer.address, a.session, USDC, USDC)
    with reverts("ReferenceAlreadyUsed", reference):
        _collect(dep, payer.address, a.session, USDC, 2 * USDC, reference=reference)
    # references are shared by both methods
    dep.mint(a.bob.address, USDC)
    auth = authorization(
        dep, a.bob, a.bob.address, dep.settlement.address, USDC, kind="ReceiveWithAuthorization"
    )
    with reverts("ReferenceAlreadyUsed", reference):
        dep.chain.send(
            dep.settlement.get_function_by_signature(BYTES)(
                auth.from_,
                auth.value,
                auth.valid_after,
                auth.valid_before,
                auth.nonce,
                auth.signature,
                reference,
            ),
            a.operator,
        )
    with reverts("InvalidReference"):
        _collect(dep, payer.address, a.session, USDC, 2 * USDC, reference=b"\x00" * 32)


def test_voucher_replay_refused(deployment: Deployment, payer) -> None:
    dep, a = deployment, deployment.actors
    deadline, signature = sign_voucher(dep, a.session, payer.address, 2 * USDC)
    collect = dep.settlement.functions.collect
    dep.chain.send(
        collect(payer.address, a.session.address, 2 * USDC, 2 * USDC, deadline, ref(), signature),
        a.operator,
    )
    # same voucher, fresh reference: nothing left to take
    with reverts("VoucherExceeded", 2 * USDC, 2 * USDC):
        dep.chain.send(
            collect(
                payer.address, a.session.address, 2 * USDC, 2 * USDC, deadline, ref(), signature
            ),
            a.operator,
        )
    # an older, smaller voucher is worthless too
    _, old = sign_voucher(dep, a.session, payer.address, USDC, deadline)
    with reverts("VoucherExceeded", 2 * USDC, USDC):
        dep.chain.send(
            collect(payer.address, a.session.address, USDC, USDC, deadline, ref(), old),
            a.operator,
        )
    # claiming a bigger cumulative amount than signed breaks the signature
    with reverts("InvalidVoucherSignature"):
        dep.chain.send(
            collect(payer.address, a.session.address, USDC, 3 * USDC, deadline, ref(), signature),
            a.operator,
        )


def test_collect_refusals(deployment: Deployment, payer) -> None:
    dep, a = deployment, deployment.actors
    with reverts("NotOperator"):
        _collect(dep, payer.address, a.session, USDC, USDC, sender=a.mallory)
    with reverts("NotOperator"):  # not even the admin collects
        _collect(dep, payer.address, a.session, USDC, USDC, sender=a.deployer)
    with reverts("InvalidVoucherSignature"):  # signed by someone else than the session key
        _collect(dep, payer.address, a.session, USDC, USDC, signer=a.mallory)
    with reverts("InvalidVoucherSignature"):  # the owner's key is not the session key either
        _collect(dep, payer.address, a.session, USDC, USDC, signer=a.alice)
    past = dep.chain.next_timestamp() - 1
    with reverts("VoucherExpired", past):
        _collect(dep, payer.address, a.session, USDC, USDC, deadline=past)
    with reverts("ZeroAmount"):
        _collect(dep, payer.address, a.session, 0, USDC)
    # a voucher for one account cannot be used on another
    deadline, signature = sign_voucher(dep, a.session, payer.address, USDC)
    other = dep.create_account(a.alice, salt=1)
    with reverts("InvalidVoucherSignature"):
        dep.chain.send(
            dep.settlement.functions.collect(
                other.address, a.session.address, USDC, USDC, deadline, ref(), signature
            ),
            a.operator,
        )
    # a key the account never granted
    with reverts("UnknownSessionKey", a.session2.address):
        _collect(dep, payer.address, a.session2, USDC, USDC)


def test_collect_from_undeployed_account_refused(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    counterfactual = dep.factory.functions.getAddress(a.carol.address, 0).call()
    dep.mint(counterfactual, 10 * USDC)
    with reverts("AccountNotDeployed", counterfactual):
        _collect(dep, counterfactual, a.session, USDC, USDC)


def test_policy_bounds_hold_even_with_valid_vouchers(deployment: Deployment, payer) -> None:
    """A malicious operator holding a huge voucher still gets at most the cap per period, only
    while the key lives, and nothing after revocation."""
    dep, a = deployment, deployment.actors
    deadline, signature = sign_voucher(
        dep, a.session, payer.address, 1_000 * USDC, dep.chain.next_timestamp() + 60 * DAY
    )
    collect = dep.settlement.functions.collect

    def pull(amount):
        return dep.chain.send(
            collect(
                payer.address, a.session.address, amount, 1_000 * USDC, deadline, ref(), signature
            ),
            a.operator,
        )

    with reverts("SessionCapExceeded", 10 * USDC, 11 * USDC):
        pull(11 * USDC)
    pull(10 * USDC)
    with reverts("SessionCapExceeded", 0, 1):
        pull(1)
    dep.chain.advance(DAY)
    pull(10 * USDC)
    dep.chain.send(payer.functions.revokeSessionKey(a.session.address), a.alice)
    with reverts("UnknownSessionKey", a.session.address):
        pull(1)
    # a failed pull leaves no trace: collected counts only what was taken
    assert dep.settlement.functions.collected(payer.address, a.session.address).call() == (
        20 * USDC
    )


def test_policy_for_another_payee_refused(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    dep.mint(account.address, 10 * USDC)
    valid_until = dep.chain.next_timestamp() + DAY
    dep.chain.send(
        account.functions.grantSessionKey(
            a.session.address, policy(dep.usdc.address, a.bob.address, 10 * USDC, DAY, valid_until)
        ),
        a.alice,
    )
    with reverts("NotSessionPayee", dep.settlement.address):
        _collect(dep, account.address, a.session, USDC, USDC)
    # and a policy for another token
    dep.chain.send(
        account.functions.grantSessionKey(
            a.session.address,
            policy(dep.other_token.address, dep.settlement.address, 10 * USDC, DAY, valid_until),
        ),
        a.alice,
    )
    with reverts("WrongSessionToken", dep.usdc.address):
        _collect(dep, account.address, a.session, USDC, USDC)


def test_settle_with_authorization_both_forms(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    settlement = dep.settlement
    dep.mint(a.bob.address, 10 * USDC)
    dep.mint(settlement.address, 1)  # same storage cost for both forms in the gas table
    for form in ("v,r,s", "bytes"):
        auth = authorization(
            dep,
            a.bob,
            a.bob.address,
            settlement.address,
            2 * USDC,
            kind="ReceiveWithAuthorization",
        )
        reference = ref()
        head = (auth.from_, auth.value, auth.valid_after, auth.valid_before, auth.nonce)
        if form == "bytes":
            call = settlement.get_function_by_signature(BYTES)(*head, auth.signature, reference)
        else:
            call = settlement.get_function_by_signature(VRS)(*head, *auth.vrs, reference)
        with reverts("NotOperator"):
            dep.chain.send(call, a.mallory)
        receipt = dep.chain.send(
            call, a.operator, label=f"settlement settleWithAuthorization ({form})"
        )
        settled = event_args(settlement, receipt, "Settled")
        assert [(e["payer"], e["amount"], e["method"], e["ref"]) for e in settled] == [
            (a.bob.address, 2 * USDC, METHOD_EIP3009, reference)
        ]
        with reverts("ReferenceAlreadyUsed", reference):
            dep.chain.send(call, a.operator)
        # the same authorization under a new reference: the token refuses the nonce
        if form == "bytes":
            again = settlement.get_function_by_signature(BYTES)(*head, auth.signature, ref())
        else:
            again = settlement.get_function_by_signature(VRS)(*head, *auth.vrs, ref())
        with reverts("AuthorizationUsedOrCanceled"):
            dep.chain.send(again, a.operator)
    assert dep.usdc.functions.balanceOf(settlement.address).call() == 4 * USDC + 1


def test_settle_with_authorization_refusals(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    settlement = dep.settlement
    dep.mint(a.bob.address, 10 * USDC)
    # an authorization paying someone else cannot be settled here
    elsewhere = authorization(
        dep, a.bob, a.bob.address, a.carol.address, USDC, kind="ReceiveWithAuthorization"
    )
    head = (
        elsewhere.from_,
        elsewhere.value,
        elsewhere.valid_after,
        elsewhere.valid_before,
        elsewhere.nonce,
    )
    with reverts("InvalidSignature"):
        dep.chain.send(
            settlement.get_function_by_signature(BYTES)(*head, elsewhere.signature, ref()),
            a.operator,
        )
    # a TransferWithAuthorization (front-runnable) signature is not a receive authorization
    transfer = authorization(dep, a.bob, a.bob.address, settlement.address, USDC)
    head = (
        transfer.from_,
        transfer.value,
        transfer.valid_after,
        transfer.valid_before,
        transfer.nonce,
    )
    with reverts("InvalidSignature"):
        dep.chain.send(
            settlement.get_function_by_signature(VRS)(*head, *transfer.vrs, ref()), a.operator
        )
    with reverts("ZeroAmount"):
        dep.chain.send(
            settlement.get_function_by_signature(BYTES)(
                a.bob.address, 0, 0, 2**40, b"\x01" * 32, b"", ref()
            ),
            a.operator,
        )


def test_settle_with_authorization_from_smart_account(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    dep.mint(account.address, 10 * USDC)
    auth = authorization(
        dep,
        a.alice,
        account.address,
        dep.settlement.address,
        4 * USDC,
        kind="ReceiveWithAuthorization",
        wrap_for_account=account,
    )
    reference = ref()
    receipt = dep.chain.send(
        dep.settlement.get_function_by_signature(BYTES)(
            auth.from_,
            auth.value,
            auth.valid_after,
            auth.valid_before,
            auth.nonce,
            auth.signature,
            reference,
        ),
        a.operator,
        label="settlement settleWithAuthorization (ERC-1271 account)",
    )
    settled = event_args(dep.settlement, receipt, "Settled")
    assert [(e["payer"], e["amount"], e["method"]) for e in settled] == [
        (account.address, 4 * USDC, METHOD_EIP3009)
    ]


def _settle_transfer(dep: Deployment, auth, reference: bytes, *, bytes_form: bool = True):
    """The prepared settleWithTransferAuthorization call for an x402-style authorization."""
    head = (auth.from_, auth.value, auth.valid_after, auth.valid_before, auth.nonce)
    if bytes_form:
        fn = dep.settlement.get_function_by_signature(TRANSFER_BYTES)
        return fn(*head, auth.signature, reference)
    return dep.settlement.get_function_by_signature(TRANSFER_VRS)(*head, *auth.vrs, reference)


def test_transfer_authorization_method_number(deployment: Deployment) -> None:
    settlement = deployment.settlement
    assert settlement.functions.METHOD_SESSION_DEBIT().call() == METHOD_SESSION_DEBIT
    assert settlement.functions.METHOD_EIP3009().call() == METHOD_EIP3009
    assert settlement.functions.METHOD_EIP3009_TRANSFER().call() == METHOD_EIP3009_TRANSFER


def test_settle_with_transfer_authorization_both_forms(deployment: Deployment) -> None:
    """A standard x402 "exact" payment (TransferWithAuthorization to the settlement) settles
    with one Settled event naming the reference."""
    dep, a = deployment, deployment.actors
    settlement = dep.settlement
    dep.mint(a.bob.address, 10 * USDC)
    dep.mint(settlement.address, 1)  # same storage cost for both forms in the gas table
    for bytes_form, label in ((True, "EOA"), (False, "EOA, v,r,s")):
        auth = authorization(dep, a.bob, a.bob.address, settlement.address, 2 * USDC)
        reference = ref()
        receipt = dep.chain.send(
            _settle_transfer(dep, auth, reference, bytes_form=bytes_form),
            a.operator,
            label=f"settlement settleWithTransferAuthorization ({label})",
        )
        settled = event_args(settlement, receipt, "Settled")
        assert [(e["payer"], e["amount"], e["method"], e["ref"]) for e in settled] == [
            (a.bob.address, 2 * USDC, METHOD_EIP3009_TRANSFER, reference)
        ]
        transfers = event_args(dep.usdc, receipt, "Transfer")
        assert [(e["from"], e["to"], e["value"]) for e in transfers] == [
            (a.bob.address, settlement.address, 2 * USDC)
        ]
        assert settlement.functions.referenceUsed(reference).call() is True
        assert dep.usdc.functions.authorizationState(a.bob.address, auth.nonce).call() is True
    assert dep.usdc.functions.balanceOf(settlement.address).call() == 4 * USDC + 1
    assert dep.usdc.functions.balanceOf(a.bob.address).call() == 6 * USDC


def test_settle_with_transfer_authorization_from_smart_account(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    dep.mint(account.address, 10 * USDC)
    auth = authorization(
        dep, a.alice, account.address, dep.settlement.address, 4 * USDC, wrap_for_account=account
    )
    reference = ref()
    receipt = dep.chain.send(
        _settle_transfer(dep, auth, reference),
        a.operator,
        label="settlement settleWithTransferAuthorization (ERC-1271 account)",
    )
    settled = event_args(dep.settlement, receipt, "Settled")
    assert [(e["payer"], e["amount"], e["method"], e["ref"]) for e in settled] == [
        (account.address, 4 * USDC, METHOD_EIP3009_TRANSFER, reference)
    ]
    assert dep.usdc.functions.balanceOf(dep.settlement.address).call() == 4 * USDC
    assert dep.usdc.functions.balanceOf(account.address).call() == 6 * USDC
    # the owner's plain EIP-712 signature does not speak for the account
    plain = authorization(dep, a.alice, account.address, dep.settlement.address, USDC)
    with reverts("InvalidSignature"):
        dep.chain.send(_settle_transfer(dep, plain, ref()), a.operator)


def test_settle_with_transfer_authorization_replay_and_reference(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    dep.mint(a.bob.address, 10 * USDC)
    auth = authorization(dep, a.bob, a.bob.address, dep.settlement.address, USDC)
    reference = ref()
    dep.chain.send(_settle_transfer(dep, auth, reference), a.operator)
    with reverts("ReferenceAlreadyUsed", reference):
        dep.chain.send(_settle_transfer(dep, auth, reference), a.operator)
    # the same authorization under a new reference: the token refuses the nonce, in both forms
    for bytes_form in (True, False):
        with reverts("AuthorizationUsedOrCanceled"):
            dep.chain.send(_settle_transfer(dep, auth, ref(), bytes_form=bytes_form), a.operator)
    # a fresh authorization cannot reuse a reference of another method either
    fresh = authorization(dep, a.bob, a.bob.address, dep.settlement.address, USDC)
    with reverts("ReferenceAlreadyUsed", reference):
        dep.chain.send(_settle_transfer(dep, fresh, reference), a.operator)
    with reverts("InvalidReference"):
        dep.chain.send(_settle_transfer(dep, fresh, b"\x00" * 32), a.operator)
    assert dep.usdc.functions.balanceOf(dep.settlement.address).call() == USDC


def test_settle_with_transfer_authorization_refusals(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    settlement = dep.settlement
    dep.mint(a.bob.address, 10 * USDC)
    auth = authorization(dep, a.bob, a.bob.address, settlement.address, USDC)
    for sender in (a.mallory, a.deployer, a.bob):  # not the payer, not even the admin
        with reverts("NotOperator"):
            dep.chain.send(_settle_transfer(dep, auth, ref()), sender)
    # signed by someone else than `from`
    forged = authorization(dep, a.mallory, a.bob.address, settlement.address, USDC)
    for bytes_form in (True, False):
        with reverts("InvalidSignature"):
            dep.chain.send(_settle_transfer(dep, forged, ref(), bytes_form=bytes_form), a.operator)
    # an authorization paying someone else cannot be redirected here
    elsewhere = authorization(dep, a.bob, a.bob.address, a.carol.address, USDC)
    with reverts("InvalidSignature"):
        dep.chain.send(_settle_transfer(dep, elsewhere, ref()), a.operator)
    # a ReceiveWithAuthorization signature is not a transfer authorization
    receive = authorization(
        dep, a.bob, a.bob.address, settlement.address, USDC, kind="ReceiveWithAuthorization"
    )
    with reverts("InvalidSignature"):
        dep.chain.send(_settle_transfer(dep, receive, ref()), a.operator)
    # claiming more than signed breaks the signature
    auth.value = 2 * USDC
    with reverts("InvalidSignature"):
        dep.chain.send(_settle_transfer(dep, auth, ref()), a.operator)
    with reverts("ZeroAmount"):
        dep.chain.send(
            settlement.get_function_by_signature(TRANSFER_BYTES)(
                a.bob.address, 0, 0, 2**40, b"\x01" * 32, b"", ref()
            ),
            a.operator,
        )
    # more than the payer holds
    rich = authorization(dep, a.bob, a.bob.address, settlement.address, 11 * USDC)
    with reverts("InsufficientBalance", 10 * USDC, 11 * USDC):
        dep.chain.send(_settle_transfer(dep, rich, ref()), a.operator)
    assert dep.usdc.functions.balanceOf(settlement.address).call() == 0


def test_settle_with_transfer_authorization_validity_window(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    dep.mint(a.bob.address, 10 * USDC)
    t = dep.chain.next_timestamp()
    expired = authorization(
        dep, a.bob, a.bob.address, dep.settlement.address, USDC, valid_before=t - 1
    )
    with reverts("AuthorizationExpired"):
        dep.chain.send(_settle_transfer(dep, expired, ref()), a.operator)
    future = authorization(
        dep,
        a.bob,
        a.bob.address,
        dep.settlement.address,
        USDC,
        valid_after=t + 100,
        valid_before=t + 1000,
    )
    reference = ref()
    with reverts("AuthorizationNotYetValid"):
        dep.chain.send(_settle_transfer(dep, future, reference), a.operator)
    # a refused settlement leaves its reference unused
    assert dep.settlement.functions.referenceUsed(reference).call() is False
    dep.chain.advance(200)
    dep.chain.send(_settle_transfer(dep, future, reference), a.operator)
    assert dep.usdc.functions.balanceOf(dep.settlement.address).call() == USDC


def test_settle_with_transfer_authorization_front_run(deployment: Deployment) -> None:
    """Anyone holding the signed authorization can submit it to the token first: the funds still
    arrive at the settlement contract (nobody can redirect them), without a Settled event, and
    the operator's settlement then reverts; the server sees the nonce used on the token."""
    dep, a = deployment, deployment.actors
    settlement = dep.settlement
    dep.mint(a.bob.address, 10 * USDC)
    auth = authorization(dep, a.bob, a.bob.address, settlement.address, 3 * USDC)
    transfer = dep.usdc.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )
    receipt = dep.chain.send(transfer(*auth.args, auth.signature), a.mallory)
    assert event_args(settlement, receipt, "Settled") == []
    used = event_args(dep.usdc, receipt, "AuthorizationUsed")
    assert [(e["authorizer"], e["nonce"]) for e in used] == [(a.bob.address, auth.nonce)]
    transfers = event_args(dep.usdc, receipt, "Transfer")
    assert [(e["from"], e["to"], e["value"]) for e in transfers] == [
        (a.bob.address, settlement.address, 3 * USDC)
    ]
    assert dep.usdc.functions.authorizationState(a.bob.address, auth.nonce).call() is True

    reference = ref()
    with reverts("AuthorizationUsedOrCanceled"):
        dep.chain.send(_settle_transfer(dep, auth, reference), a.operator)
    assert settlement.functions.referenceUsed(reference).call() is False
    assert dep.usdc.functions.balanceOf(settlement.address).call() == 3 * USDC
    assert dep.usdc.functions.balanceOf(a.bob.address).call() == 7 * USDC
    assert dep.usdc.functions.balanceOf(a.mallory.address).call() == 0
    # nor can a (fresh) authorization be changed to pay the front-runner instead
    redirected = authorization(dep, a.bob, a.bob.address, settlement.address, 3 * USDC)
    redirected.to = a.mallory.address
    with reverts("InvalidSignature"):
        dep.chain.send(transfer(*redirected.args, redirected.signature), a.mallory)


def test_sweep_to_treasury(deployment: Deployment, payer) -> None:
    dep, a = deployment, deployment.actors
    settlement = dep.settlement
    _collect(dep, payer.address, a.session, 6 * USDC, 6 * USDC)
    with reverts("NotOperatorOrAdmin"):
        dep.chain.send(settlement.functions.sweep(dep.usdc.address, USDC), a.mallory)
    receipt = dep.chain.send(
        settlement.functions.sweep(dep.usdc.address, 2 * USDC),
        a.operator,
        label="settlement sweep",
    )
    swept = event_args(settlement, receipt, "Swept")
    assert [(e["token"], e["treasury"], e["amount"]) for e in swept] == [
        (dep.usdc.address, a.treasury.address, 2 * USDC)
    ]
    dep.chain.send(settlement.functions.sweep(dep.usdc.address, USDC), a.deployer)  # admin
    assert dep.usdc.functions.balanceOf(a.treasury.address).call() == 3 * USDC
    with reverts("TokenTransferFailed"):
        dep.chain.send(settlement.functions.sweep(dep.usdc.address, 4 * USDC), a.operator)

    # a new treasury set by the admin receives the rest
    with reverts("NotAdmin"):
        dep.chain.send(settlement.functions.setTreasury(a.mallory.address), a.operator)
    dep.chain.send(settlement.functions.setTreasury(a.carol.address), a.deployer)
    dep.chain.send(settlement.functions.sweep(dep.usdc.address, 3 * USDC), a.operator)
    assert dep.usdc.functions.balanceOf(a.carol.address).call() == 3 * USDC


def test_roles(deployment: Deployment, payer) -> None:
    dep, a = deployment, deployment.actors
    settlement = dep.settlement
    zero = "0x" + "00" * 20
    with reverts("NotAdmin"):
        dep.chain.send(settlement.functions.setOperator(a.mallory.address), a.operator)
    with reverts("ZeroAddress"):
        dep.chain.send(settlement.functions.setOperator(zero), a.deployer)
    receipt = dep.chain.send(settlement.functions.setOperator(a.bob.address), a.deployer)
    changed = event_args(settlement, receipt, "OperatorChanged")
    assert [(e["previousOperator"], e["newOperator"]) for e in changed] == [
        (a.operator.address, a.bob.address)
    ]
    with reverts("NotOperator"):  # the old operator is out
        _collect(dep, payer.address, a.session, USDC, USDC)
    _collect(dep, payer.address, a.session, USDC, USDC, sender=a.bob)

    with reverts("NotAdmin"):
        dep.chain.send(settlement.functions.transferAdmin(a.mallory.address), a.mallory)
    dep.chain.send(settlement.functions.transferAdmin(a.carol.address), a.deployer)
    assert settlement.functions.admin().call() == a.carol.address
    with reverts("NotAdmin"):
        dep.chain.send(settlement.functions.setOperator(a.deployer.address), a.deployer)
