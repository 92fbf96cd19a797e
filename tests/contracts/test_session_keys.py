"""TollgateAccount session keys: grant / revoke and the capped, payee-only sessionDebit.

Here the policy's payee is an EOA (bob) so the account's own rules are tested directly; the
settlement contract as payee is tested in test_settlement.py."""

from __future__ import annotations

import pytest

from .conftest import USDC, Deployment, event_args, policy, reverts

DAY = 86_400


@pytest.fixture
def funded_account(deployment: Deployment):
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    dep.mint(account.address, 100 * USDC)
    dep.mint(account.address, 100 * USDC, token=dep.other_token)
    return account


def _grant(
    dep: Deployment,
    account,
    key,
    *,
    cap=10 * USDC,
    period=DAY,
    ttl=30 * DAY,
    payee=None,
    token=None,
    label="",
):
    valid_until = dep.chain.next_timestamp() + ttl
    pol = policy(
        (token or dep.usdc).address, payee or dep.actors.bob.address, cap, period, valid_until
    )
    receipt = dep.chain.send(
        account.functions.grantSessionKey(key.address, pol), dep.actors.alice, label=label
    )
    return pol, receipt


def _debit(dep: Deployment, account, key, amount, *, token=None, sender=None, label=""):
    return dep.chain.send(
        account.functions.sessionDebit(key.address, (token or dep.usdc).address, amount),
        sender or dep.actors.bob,
        label=label,
    )


def test_grant_and_view(deployment: Deployment, funded_account) -> None:
    dep, a = deployment, deployment.actors
    account = funded_account
    pol, receipt = _grant(dep, account, a.session, label="account grantSessionKey")
    granted = event_args(account, receipt, "SessionKeyGranted")
    assert len(granted) == 1
    assert granted[0]["key"] == a.session.address
    assert granted[0]["payee"] == a.bob.address
    assert granted[0]["capPerPeriod"] == 10 * USDC
    stored, live = account.functions.sessionPolicy(a.session.address).call()
    assert tuple(stored) == pol
    assert live is True
    assert account.functions.sessionAvailable(a.session.address).call() == 10 * USDC
    unknown, unknown_live = account.functions.sessionPolicy(a.session2.address).call()
    assert unknown_live is False
    assert unknown[0] == "0x" + "00" * 20


def test_grant_refusals(deployment: Deployment, funded_account) -> None:
    dep, a = deployment, deployment.actors
    account = funded_account
    now = dep.chain.next_timestamp()
    good = policy(dep.usdc.address, a.bob.address, USDC, DAY, now + DAY)
    with reverts("NotOwnerOrEntryPoint"):
        dep.chain.send(account.functions.grantSessionKey(a.mallory.address, good), a.mallory)
    zero = "0x" + "00" * 20
    bad_policies = [
        policy(zero, a.bob.address, USDC, DAY, now + DAY),
        policy(dep.usdc.address, zero, USDC, DAY, now + DAY),
        policy(dep.usdc.address, a.bob.address, USDC, 0, now + DAY),
        policy(dep.usdc.address, a.bob.address, USDC, DAY, now - 1),
    ]
    for bad in bad_policies:
        with reverts("InvalidSessionPolicy"):
            dep.chain.send(account.functions.grantSessionKey(a.session.address, bad), a.alice)
    with reverts("InvalidSessionPolicy"):
        dep.chain.send(account.functions.grantSessionKey(zero, good), a.alice)
    with reverts("UnknownSessionKey", a.session.address):
        dep.chain.send(account.functions.revokeSessionKey(a.session.address), a.alice)


def test_grant_through_entry_point_execute(deployment: Deployment, funded_account) -> None:
    """The UserOperation path: EntryPoint -> execute(self, grantSessionKey(...))."""
    dep, a = deployment, deployment.actors
    account = funded_account
    pol = policy(dep.usdc.address, a.bob.address, USDC, DAY, dep.chain.next_timestamp() + DAY)
    call = account.encode_abi("grantSessionKey", args=[a.session.address, pol])
    dep.chain.send(account.functions.execute(account.address, 0, call), a.entry_point)
    assert account.functions.sessionPolicy(a.session.address).call()[1] is True


def test_debit_within_cap_and_cap_exceeded(deployment: Deployment, funded_account) -> None:
    dep, a = deployment, deployment.actors
    account = funded_account
    _grant(dep, account, a.session)
    receipt = _debit(dep, account, a.session, 4 * USDC, label="account sessionDebit (direct)")
    debited = event_args(account, receipt, "SessionDebited")
    assert [(e["key"], e["payee"], e["amount"], e["spentInPeriod"]) for e in debited] == [
        (a.session.address, a.bob.address, 4 * USDC, 4 * USDC)
    ]
    _debit(dep, account, a.session, 6 * USDC)
    assert dep.usdc.functions.balanceOf(a.bob.address).call() == 10 * USDC
    assert account.functions.sessionAvailable(a.session.address).call() == 0
    with reverts("SessionCapExceeded", 0, 1):
        _debit(dep, account, a.session, 1)


def test_cap_resets_after_period(deployment: Deployment, funded_account) -> None:
    dep, a = deployment, deployment.actors
    account = funded_account
    _grant(dep, account, a.session, cap=10 * USDC, period=DAY)
    _debit(dep, account, a.session, 8 * USDC)
    with reverts("SessionCapExceeded", 2 * USDC, 3 * USDC):
        _debit(dep, account, a.session, 3 * USDC)
    dep.chain.advance(DAY // 2)
    with reverts("SessionCapExceeded", 2 * USDC, 3 * USDC):  # same window still
        _debit(dep, account, a.session, 3 * USDC)
    dep.chain.advance(DAY // 2 + 1)
    assert account.functions.sessionAvailable(a.session.address).call() == 10 * USDC
    _debit(dep, account, a.session, 10 * USDC, label="account sessionDebit (new period)")
    with reverts("SessionCapExceeded", 0, 1):
        _debit(dep, account, a.session, 1)
    # several idle periods later the cap is back, once
    dep.chain.advance(3 * DAY + 5)
    _debit(dep, account, a.session, 10 * USDC)
    with reverts("SessionCapExceeded", 0, 1):
        _debit(dep, account, a.session, 1)
    assert dep.usdc.functions.balanceOf(a.bob.address).call() == 28 * USDC


def test_expired_key_refused(deployment: Deployment, funded_account) -> None:
    dep, a = deployment, deployment.actors
    account = funded_account
    _grant(dep, account, a.session, ttl=100)
    _debit(dep, account, a.session, USDC)
    dep.chain.advance(100)
    assert account.functions.sessionPolicy(a.session.address).call()[1] is False
    assert account.functions.sessionAvailable(a.session.address).call() == 0
    with reverts("SessionKeyExpired", a.session.address):
        _debit(dep, account, a.session, USDC)


def test_revoked_key_refused(deployment: Deployment, funded_account) -> None:
    dep, a = deployment, deployment.actors
    account = funded_account
    _grant(dep, account, a.session)
    _debit(dep, account, a.session, USDC)
    with reverts("NotOwnerOrEntryPoint"):
        dep.chain.send(account.functions.revokeSessionKey(a.session.address), a.mallory)
    receipt = dep.chain.send(
        account.functions.revokeSessionKey(a.session.address),
        a.alice,
        label="account revokeSessionKey",
    )
    assert [e["key"] for e in event_args(account, receipt, "SessionKeyRevoked")] == [
        a.session.address
    ]
    assert account.functions.sessionPolicy(a.session.address).call()[1] is False
    with reverts("UnknownSessionKey", a.session.address):
        _debit(dep, account, a.session, USDC)


def test_wrong_payee_and_wrong_token_refused(deployment: Deployment, funded_account) -> None:
    dep, a = deployment, deployment.actors
    account = funded_account
    _grant(dep, account, a.session)
    with reverts("NotSessionPayee", a.mallory.address):
        _debit(dep, account, a.session, USDC, sender=a.mallory)
    with reverts("NotSessionPayee", a.alice.address):  # not even the owner pulls as payee
        _debit(dep, account, a.session, USDC, sender=a.alice)
    with reverts("WrongSessionToken", dep.other_token.address):
        _debit(dep, account, a.session, USDC, token=dep.other_token)
    with reverts("UnknownSessionKey", a.session2.address):  # a key never granted
        _debit(dep, account, a.session2, USDC)


def test_keys_are_independent_and_regrant_resets(deployment: Deployment, funded_account) -> None:
    dep, a = deployment, deployment.actors
    account = funded_account
    _grant(dep, account, a.session, cap=5 * USDC)
    _grant(dep, account, a.session2, cap=3 * USDC, token=dep.other_token)
    _debit(dep, account, a.session, 5 * USDC)
    _debit(dep, account, a.session2, 3 * USDC, token=dep.other_token)
    with reverts("SessionCapExceeded", 0, 1):
        _debit(dep, account, a.session, 1)
    _grant(dep, account, a.session, cap=7 * USDC)  # the owner re-grants: a fresh window
    _debit(dep, account, a.session, 7 * USDC)
    assert dep.other_token.functions.balanceOf(a.bob.address).call() == 3 * USDC
    assert dep.usdc.functions.balanceOf(a.bob.address).call() == 12 * USDC


def test_debit_fails_when_account_lacks_funds(deployment: Deployment) -> None:
    dep, a = deployment, deployment.actors
    account = dep.create_account(a.alice)
    dep.mint(account.address, USDC)
    _grant(dep, account, a.session)
    with reverts("TokenTransferFailed"):
        _debit(dep, account, a.session, 2 * USDC)
