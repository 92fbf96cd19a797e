"""The lease policy shared by credit and rate-limit leases."""

from __future__ import annotations

from app.proxy.lease_scale import LeaseScale


def test_an_account_is_busy_when_two_admissions_fall_within_the_window() -> None:
    scale = LeaseScale(base=16, maximum=64, window_s=1.0)
    assert not scale.admitted(7, now=10.0), "a first admission is not busy"
    assert scale.admitted(7, now=10.5)
    assert not scale.admitted(7, now=12.0), "1.5 s later: not busy"
    scale.busy(7, now=20.0)
    assert scale.admitted(7, now=20.2), "a spent lease counts as a recent admission"


def test_leases_double_when_spent_early_and_halve_when_unused() -> None:
    scale = LeaseScale(base=16, maximum=64, window_s=1.0)
    assert scale.calls(1) == 16
    scale.spent_early(1, planned=16)
    assert scale.calls(1) == 32
    scale.spent_early(1, planned=32)
    scale.spent_early(1, planned=64)
    assert scale.calls(1) == 64, "never above the maximum"
    scale.expired(1, planned=64, used=40)
    assert scale.calls(1) == 64, "more than half used: kept"
    scale.expired(1, planned=64, used=10)
    assert scale.calls(1) == 32
    scale.expired(1, planned=32, used=0)
    scale.expired(1, planned=16, used=0)
    assert scale.calls(1) == 16, "never below the base"
    assert scale.calls(2) == 16, "accounts do not share a size"
