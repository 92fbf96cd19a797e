"""Ethereum addresses as they come from outside: parsed, checksum-checked, lowercased."""

from __future__ import annotations

import re

from eth_utils import is_checksum_address

from app.errors import InvalidRequest

ADDRESS_PATTERN = re.compile(r"0x[0-9a-fA-F]{40}")
ZERO_ADDRESS = "0x" + "0" * 40


def is_address(value: object) -> bool:
    """A lowercase ``0x`` address as this module produces and the database stores."""
    return isinstance(value, str) and value == value.lower() and bool(
        ADDRESS_PATTERN.fullmatch(value)
    ) and value != ZERO_ADDRESS


def parse_address(value: object, param: str) -> str:
    """The lowercase form of a ``0x`` address, or ``InvalidRequest`` naming ``param``.

    Mixed case is an EIP-55 checksum and must be right: a typo in a checksummed
    address is caught here instead of binding a session to somebody else's account.
    All-lowercase and all-uppercase digits carry no checksum and are accepted.
    """
    if not isinstance(value, str) or not ADDRESS_PATTERN.fullmatch(value):
        raise InvalidRequest(
            f"{param} must be a 0x-prefixed 20-byte hex address", param=param,
            code="invalid_address",
        )
    digits = value[2:]
    if digits not in (digits.lower(), digits.upper()) and not is_checksum_address(value):
        raise InvalidRequest(
            f"{param} has a wrong EIP-55 checksum", param=param, code="invalid_address_checksum"
        )
    address = value.lower()
    if address == ZERO_ADDRESS:
        raise InvalidRequest(
            f"{param} must not be the zero address", param=param, code="invalid_address"
        )
    return address
