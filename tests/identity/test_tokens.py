"""Bearer tokens on protected endpoints: every bad token is a 401 with its own code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDictProxy

from app.config.catalog import Catalog
from app.http.app import Backends
from tests.conftest import TEST_JWT_SECRET, RunningTollgate, make_settings, start_tollgate
from tests.identity.conftest import assert_error, assert_token_refused
from tests.identity.wallets import authorize, bearer

HELLO = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


async def chat(http: aiohttp.ClientSession, running: RunningTollgate,
               headers: Any = None) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    async with http.post(f"{running.v1}/chat/completions", json=HELLO,
                         headers=headers) as response:
        return response.status, await response.json(), response.headers


@pytest.fixture(scope="module")
async def claims(http: aiohttp.ClientSession, tollgate: RunningTollgate
                 ) -> dict[str, Any]:
    """The claims of a live session, to forge variants of."""
    issued = await authorize(http, tollgate.url)
    decoded: dict[str, Any] = jwt.decode(issued["token"], TEST_JWT_SECRET,
                                         algorithms=["HS256"], audience="tollgate-api")
    return decoded


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())


def signed(payload: dict[str, Any], key: str = TEST_JWT_SECRET) -> str:
    return jwt.encode(payload, key, algorithm="HS256")


def tampered(payload: dict[str, Any]) -> str:
    """A genuine token whose payload is swapped for another without re-signing."""
    genuine = signed(payload)
    header, _, signature = genuine.split(".")
    forged = _b64(json.dumps({**payload, "sub": "acct_999999999"}).encode())
    return f"{header}.{forged}.{signature}"


def alg_none(payload: dict[str, Any]) -> str:
    return _segments({"alg": "none", "typ": "JWT"}, payload) + "."


def without(payload: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in payload.items() if key != name}


Forge = Callable[[dict[str, Any]], str]

BAD_TOKENS: list[tuple[str, Forge, str]] = [
    ("not a JWT", lambda claims: "abc.def.ghi", "malformed_token"),
    ("two segments", lambda claims: signed(claims).rsplit(".", 1)[0], "malformed_token"),
    ("tampered payload", tampered, "invalid_token_signature"),
    ("wrong key", lambda claims: signed(claims, "another-secret-" * 4),
     "invalid_token_signature"),
    ("alg none", alg_none, "invalid_token_algorithm"),
    ("alg HS512", lambda claims: jwt.encode(claims, TEST_JWT_SECRET * 2, algorithm="HS512"),
     "invalid_token_algorithm"),
    ("expired", lambda claims: signed({**claims, "exp": int(time.time()) - 120}),
     "token_expired"),
    ("issued in the future", lambda claims: signed({**claims, "iat": int(time.time()) + 600}),
     "token_not_yet_valid"),
    ("wrong audience", lambda claims: signed({**claims, "aud": "someone-else"}),
     "invalid_token_audience"),
    ("audience list", lambda claims: signed({**claims, "aud": ["tollgate-api", "other"]}),
     "invalid_token_audience"),
    ("wrong issuer", lambda claims: signed({**claims, "iss": "evil"}), "invalid_token_issuer"),
    ("no jti", lambda claims: signed(without(claims, "jti")), "invalid_token_claims"),
    ("no exp", lambda claims: signed(without(claims, "exp")), "invalid_token_claims"),
    ("bad wallet claim", lambda claims: signed({**claims, "wallet": "me"}),
     "invalid_token_claims"),
    ("unknown session", lambda claims: signed({**claims, "jti": "0" * 32}), "unknown_session"),
    ("claims disagree with the session",
     lambda claims: signed({**claims, "sub": "acct_999999999"}), "invalid_token_claims"),
]


@pytest.mark.parametrize(("name", "forge", "code"), BAD_TOKENS,
                         ids=[name for name, _, _ in BAD_TOKENS])
async def test_bad_tokens_are_401_with_a_challenge(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, claims: dict[str, Any],
    name: str, forge: Forge, code: str,
) -> None:
    status, body, headers = await chat(http, tollgate, bearer(forge(claims)))
    assert_token_refused(status, body, headers, code)


@pytest.mark.parametrize(("name", "headers", "code"), [
    ("basic scheme", {"Authorization": "Basic dXNlcjpwYXNz"}, "malformed_token"),
    ("no token", {"Authorization": "Bearer"}, "malformed_token"),
    ("bad characters", {"Authorization": "Bearer a.b.c!"}, "malformed_token"),
    ("over 4 KiB", {"Authorization": "Bearer " + "a" * 4100}, "malformed_token"),
    ("two headers", [("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer a.b.c")],
     "malformed_token"),
])
async def test_malformed_authorization_headers(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, name: str,
    headers: Any, code: str,
) -> None:
    status, body, response_headers = await chat(http, tollgate, headers)
    assert_token_refused(status, body, response_headers, code)


async def test_missing_token_gets_the_bare_challenge(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    status, body, headers = await chat(http, tollgate)
    error = assert_error(status, body, 401, "missing_token")
    assert error["type"] == "authentication_error"
    # RFC 6750 section 3.1: no error code when the request carried no credentials.
    assert headers["WWW-Authenticate"] == 'Bearer realm="tollgate"'
    assert headers["X-Request-Id"].startswith("req_")


async def test_lowercase_bearer_scheme_is_accepted(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, session_token: str
) -> None:
    status, body, _ = await chat(http, tollgate,
                                 {"Authorization": f"bearer {session_token}"})
    assert status == 200, body


async def test_public_endpoints_need_no_token(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    for path in ("/v1/models", "/v1/models/test-model", "/health/live", "/health/ready",
                 "/metrics", "/v1/authorize/schema"):
        async with http.get(f"{tollgate.url}{path}") as response:
            assert response.status == 200, path


# -- ES256 -------------------------------------------------------------------------------


def _p256_pem() -> tuple[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


@pytest.fixture(scope="module")
async def es256(catalog: Catalog, backends: Backends
                ) -> AsyncIterator[tuple[RunningTollgate, bytes]]:
    private, public = _p256_pem()
    running = await start_tollgate(
        make_settings(jwt_algorithm="ES256", jwt_private_key_pem=private), catalog, backends)
    yield running, public
    await running.runner.cleanup()


async def test_es256_tokens_work_and_hs256_is_refused(
    http: aiohttp.ClientSession, es256: tuple[RunningTollgate, bytes]
) -> None:
    running, public_pem = es256
    issued = await authorize(http, running.url)
    assert jwt.get_unverified_header(issued["token"])["alg"] == "ES256"
    status, body, _ = await chat(http, running, bearer(issued["token"]))
    assert status == 200, body

    payload = jwt.decode(issued["token"], public_pem, algorithms=["ES256"],
                         audience="tollgate-api")
    # Algorithm confusion: HS256 keyed with the public key must not verify.
    unsigned = _segments({"alg": "HS256", "typ": "JWT"}, payload)
    mac = hmac.new(public_pem, unsigned.encode(), hashlib.sha256).digest()
    status, body, headers = await chat(http, running,
                                       bearer(f"{unsigned}.{_b64(mac)}"))
    assert_token_refused(status, body, headers, "invalid_token_algorithm")
    status, body, headers = await chat(http, running, bearer(signed(payload)))
    assert_token_refused(status, body, headers, "invalid_token_algorithm")


# -- the state-dir secret ----------------------------------------------------------------


async def test_without_a_secret_instances_sharing_a_state_dir_share_the_key(
    http: aiohttp.ClientSession, catalog: Catalog, backends: Backends
) -> None:
    shared = Path(tempfile.mkdtemp(prefix="tg-state-", dir="/tmp"))
    elsewhere = Path(tempfile.mkdtemp(prefix="tg-state-", dir="/tmp"))
    first = await start_tollgate(make_settings(jwt_secret=None, state_dir=shared),
                                 catalog, backends)
    second = await start_tollgate(make_settings(jwt_secret=None, state_dir=shared),
                                  catalog, backends)
    stranger = await start_tollgate(make_settings(jwt_secret=None, state_dir=elsewhere),
                                    catalog, backends)
    try:
        issued = await authorize(http, first.url)
        status, body, _ = await chat(http, second, bearer(issued["token"]))
        assert status == 200, body
        status, body, headers = await chat(http, stranger, bearer(issued["token"]))
        assert_token_refused(status, body, headers, "invalid_token_signature")
    finally:
        for running in (first, second, stranger):
            await running.runner.cleanup()
    assert (shared / "jwt-secret").stat().st_mode & 0o777 == 0o600
