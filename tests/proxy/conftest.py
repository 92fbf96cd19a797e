"""The proxy tests call as one authenticated account: here ``http`` carries its session token."""

from __future__ import annotations

import aiohttp
import pytest


@pytest.fixture(scope="session")
def http(authed_http: aiohttp.ClientSession) -> aiohttp.ClientSession:
    return authed_http
