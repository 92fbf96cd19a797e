"""Which requests the per-IP limit applies to."""

from __future__ import annotations

import pytest

from app.limits.ip_limit import is_unauthenticated


@pytest.mark.parametrize(
    ("method", "path", "limited"),
    [
        ("POST", "/v1/authorize", True),
        ("GET", "/v1/authorize/check", True),
        ("GET", "/v1/authorize/schema", True),
        ("HEAD", "/v1/authorize/schema", True),
        ("DELETE", "/v1/authorize", False),  # signing out is authenticated
        ("GET", "/v1/authorize", False),
        ("GET", "/v1/authorize/schema/", False),
        ("POST", "/v1/chat/completions", False),
        ("GET", "/v1/models", False),
    ],
)
def test_only_the_unauthenticated_endpoints_are_ip_limited(
    method: str, path: str, limited: bool
) -> None:
    assert is_unauthenticated(method, path) is limited
