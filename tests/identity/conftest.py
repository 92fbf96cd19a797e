"""Helpers shared by the identity tests."""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDictProxy


def assert_error(
    status: int, body: dict[str, Any], expected_status: int, code: str,
    param: str | None = None,
) -> dict[str, Any]:
    """The answer is an OpenAI-shaped error with this status and code; returns the error."""
    assert status == expected_status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error  # type: ignore[no-any-return]


def assert_token_refused(
    status: int, body: dict[str, Any], headers: CIMultiDictProxy[str], code: str
) -> None:
    """A 401 with the RFC 6750 challenge for a presented but unusable token."""
    error = assert_error(status, body, 401, code)
    assert error["type"] == "authentication_error"
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="tollgate", error="invalid_token", '
                                'error_description="'), challenge
    assert error["message"] in challenge
