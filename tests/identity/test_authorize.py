"""POST /v1/authorize: a wallet-signed EIP-712 Authorization becomes a session token."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import jwt
import pytest
import sqlalchemy as sa
from eth_account import Account
from eth_account.messages import encode_typed_data

from app.errors import PermissionDenied
from app.http.keys import DATABASE
from app.identity.account_cache import CACHE_TTL_S, REFRESH_AFTER_S
from app.identity.sessions import SESSIONS
from app.storage.tables import accounts, authorization_nonces, sessions
from tests.conftest import TEST_JWT_SECRET, RunningTollgate
from tests.identity.conftest import assert_error
from tests.identity.wallets import (
    CHAIN_ID,
    SIGNATURE_HEADER,
    TYPES,
    bearer,
    message,
    new_wallet,
    post_authorization,
    sign,
)

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HELLO = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


async def test_happy_path_answers_201_with_a_working_token(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet)
    status, answer, headers = await post_authorization(
        http, tollgate.url, body, sign(wallet, body))
    assert status == 201, answer
    assert headers["Cache-Control"] == "no-store"
    assert set(answer) == {"object", "token", "expiresAt", "sessionId", "account"}
    assert answer["object"] == "session"
    assert answer["expiresAt"] == body["expiresAt"]
    account = answer["account"]
    assert account["id"].startswith("acct_")
    assert account == {"id": account["id"], "wallet": wallet.address.lower(),
                       "smartAccount": wallet.address.lower(), "chainId": CHAIN_ID}

    claims = jwt.decode(answer["token"], TEST_JWT_SECRET, algorithms=["HS256"],
                        audience="tollgate-api")
    assert claims["iss"] == "tollgate" and claims["sub"] == account["id"]
    assert claims["jti"] == answer["sessionId"] and claims["exp"] == body["expiresAt"]
    assert claims["wallet"] == claims["smart_account"] == wallet.address.lower()
    assert claims["chain_id"] == CHAIN_ID
    assert claims["session_key"] == body["sessionKey"].lower()
    assert abs(claims["iat"] - time.time()) < 60

    async with http.post(f"{tollgate.v1}/chat/completions", json=HELLO,
                                   headers=bearer(answer["token"])) as response:
        assert response.status == 200, await response.text()

    # Stored lowercase, in one transaction: account, nonce and session.
    account_id = int(account["id"].removeprefix("acct_"))
    async with tollgate.app[DATABASE].connect() as connection:
        row = (await connection.execute(
            sa.select(accounts).where(accounts.c.id == account_id))).one()
        session = (await connection.execute(
            sa.select(sessions).where(sessions.c.jti == answer["sessionId"]))).one()
        nonce = await connection.scalar(sa.select(sa.func.count()).select_from(
            authorization_nonces).where(authorization_nonces.c.wallet == row.wallet,
                                        authorization_nonces.c.nonce == body["nonce"]))
    assert row.smart_account == row.wallet == wallet.address.lower()
    assert row.credit_limit_micros == 5_000_000 and row.status == "active"
    assert session.account_id == account_id and session.revoked_at is None
    assert session.session_key == body["sessionKey"].lower()
    assert int(session.expires_at.timestamp()) == body["expiresAt"]
    assert nonce == 1


async def test_a_second_session_reuses_the_account(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    first = message(wallet)
    second = message(wallet, wallet=wallet.address.lower(), smartAccount=wallet.address.upper()
                     .replace("0X", "0x"))
    one = await post_authorization(http, tollgate.url, first, sign(wallet, first))
    two = await post_authorization(http, tollgate.url, second, sign(wallet, second))
    assert one[0] == two[0] == 201
    assert one[1]["account"] == two[1]["account"], "checksum-insensitive: one account"
    assert one[1]["sessionId"] != two[1]["sessionId"]


async def test_v_as_0_or_1_is_accepted(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet)
    signature = bytes.fromhex(sign(wallet, body)[2:])
    zero_based = (signature[:64] + bytes([signature[64] - 27])).hex()  # no 0x prefix either
    status, answer, _ = await post_authorization(http, tollgate.url, body, zero_based)
    assert status == 201, answer


async def test_replayed_nonce_is_refused(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet)
    signature = sign(wallet, body)
    status, _, _ = await post_authorization(http, tollgate.url, body, signature)
    assert status == 201
    status, answer, _ = await post_authorization(http, tollgate.url, body, signature)
    error = assert_error(status, answer, 401, "nonce_reused", "nonce")
    assert error["type"] == "authentication_error"
    # The same nonce with a new signature over a new message is still a replay of the nonce.
    again = message(wallet, nonce=body["nonce"])
    status, answer, _ = await post_authorization(http, tollgate.url, again,
                                                 sign(wallet, again))
    assert_error(status, answer, 401, "nonce_reused")
    # Nonces are per wallet: another wallet may use the same one.
    other = new_wallet()
    theirs = message(other, nonce=body["nonce"])
    status, _, _ = await post_authorization(http, tollgate.url, theirs,
                                            sign(other, theirs))
    assert status == 201


async def test_concurrent_replays_give_exactly_one_session(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet)
    signature = sign(wallet, body)
    results = await asyncio.gather(*(
        post_authorization(http, tollgate.url, body, signature) for _ in range(8)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [201] + [401] * 7, statuses
    for status, answer, _ in results:
        if status == 401:
            assert answer["error"]["code"] == "nonce_reused"
    async with tollgate.app[DATABASE].connect() as connection:
        count = await connection.scalar(sa.select(sa.func.count()).select_from(sessions)
                                        .where(sessions.c.wallet == wallet.address.lower()))
    assert count == 1


def _high_s(signature: str) -> str:
    raw = bytes.fromhex(signature[2:])
    s = int.from_bytes(raw[32:64], "big")
    flipped_v = 55 - raw[64]  # 27 <-> 28
    return "0x" + (raw[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([flipped_v])).hex()


async def test_high_s_signature_is_refused_although_it_recovers(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet)
    high = _high_s(sign(wallet, body))
    # The malleated signature is mathematically valid for the same wallet...
    typed = {"types": TYPES, "primaryType": "Authorization",
             "domain": {"name": "Tollgate", "version": "1", "chainId": CHAIN_ID},
             "message": body}
    assert Account.recover_message(encode_typed_data(full_message=typed),
                                   signature=bytes.fromhex(high[2:])) == wallet.address
    # ...and still refused: only low-s is canonical.
    status, answer, _ = await post_authorization(http, tollgate.url, body, high)
    assert_error(status, answer, 401, "signature_not_low_s", SIGNATURE_HEADER)


@pytest.mark.parametrize(("name", "mangle", "code"), [
    ("not hex", lambda good: "0x" + "zz" * 65, "malformed_signature"),
    ("odd length", lambda good: good[:-1], "malformed_signature"),
    ("64 bytes", lambda good: good[:-2], "malformed_signature"),
    ("66 bytes", lambda good: good + "00", "malformed_signature"),
    ("empty", lambda good: "", "malformed_signature"),
    ("v is 29", lambda good: good[:-2] + "1d", "malformed_signature"),
    ("r is zero", lambda good: "0x" + "00" * 32 + good[66:], "invalid_signature"),
    ("s is zero", lambda good: good[:66] + "00" * 32 + good[-2:], "invalid_signature"),
    ("longer than any signature", lambda good: "0x" + "ab" * 3000, "malformed_signature"),
])
async def test_malformed_signatures_are_401(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, name: str,
    mangle: Any, code: str,
) -> None:
    wallet = new_wallet()
    body = message(wallet)
    status, answer, _ = await post_authorization(
        http, tollgate.url, body, mangle(sign(wallet, body)))
    error = assert_error(status, answer, 401, code, SIGNATURE_HEADER)
    assert error["type"] == "authentication_error"


async def test_missing_or_repeated_signature_header(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet)
    status, answer, _ = await post_authorization(http, tollgate.url, body, None)
    assert_error(status, answer, 401, "missing_signature", SIGNATURE_HEADER)
    signature = sign(wallet, body)
    headers = [(SIGNATURE_HEADER, signature), (SIGNATURE_HEADER, signature)]
    async with http.post(f"{tollgate.url}/v1/authorize", json=body,
                                   headers=headers) as response:
        assert_error(response.status, await response.json(), 401, "malformed_signature")


async def test_wrong_signer_and_altered_message_are_refused(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet, impostor = new_wallet(), new_wallet()
    body = message(wallet)
    status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                 sign(impostor, body))
    assert_error(status, answer, 401, "signature_mismatch")
    # Signed, then altered: the signature no longer covers what is sent.
    signature = sign(wallet, body)
    altered = {**body, "expiresAt": body["expiresAt"] - 1}
    status, answer, _ = await post_authorization(http, tollgate.url, altered,
                                                 signature)
    assert_error(status, answer, 401, "signature_mismatch")
    # Signed for another domain (chain 1) but sent as chain 31337.
    status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                 sign(wallet, body, domain_chain_id=1))
    assert_error(status, answer, 401, "signature_mismatch")


async def test_wrong_chain_is_401_unsupported_chain(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet, chainId=1)
    status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                 sign(wallet, body))
    error = assert_error(status, answer, 401, "unsupported_chain", "chainId")
    assert "31337" in error["message"]


def _times(issued_offset_s: int, lifetime_s: int) -> dict[str, int]:
    issued = int(time.time()) + issued_offset_s
    return {"issuedAt": issued, "expiresAt": issued + lifetime_s}


@pytest.mark.parametrize(("name", "times", "status", "code", "param"), [
    ("expired", _times(-300, 200), 401, "authorization_expired", "expiresAt"),
    ("future-dated", _times(3600, 3600), 401, "authorization_not_yet_valid", "issuedAt"),
    ("signed too long ago", _times(-700, 3600), 401, "authorization_too_old", "issuedAt"),
    ("ttl too long", _times(0, 7 * 24 * 3600 + 1), 400, "session_ttl_too_long", "expiresAt"),
    ("ends before it starts", _times(0, 0), 400, "invalid_expiry", "expiresAt"),
])
async def test_time_window(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, name: str,
    times: dict[str, int], status: int, code: str, param: str,
) -> None:
    wallet = new_wallet()
    body = message(wallet, **times)
    got, answer, _ = await post_authorization(http, tollgate.url, body,
                                              sign(wallet, body))
    assert_error(got, answer, status, code, param)


async def test_clock_skew_is_tolerated(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet, **_times(30, 3600))  # the default skew allowance is 60 s
    status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                 sign(wallet, body))
    assert status == 201, answer


async def test_smart_account_other_than_the_wallet_is_403_for_now(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet, smartAccount=new_wallet().address)
    status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                 sign(wallet, body))
    error = assert_error(status, answer, 403, "smart_account_not_verified", "smartAccount")
    assert error["type"] == "permission_error"


OK_ADDRESS = "0x52908400098527886E0F7030069857D2E4169EE7"  # EIP-55 test vector


@pytest.mark.parametrize(("name", "edit", "code", "param"), [
    ("not an object", lambda body: [body], "invalid_body", None),
    ("unknown field", lambda body: {**body, "admin": True}, "unknown_parameter", "admin"),
    ("missing nonce", lambda body: {k: v for k, v in body.items() if k != "nonce"},
     "missing_parameter", "nonce"),
    ("wallet not hex", lambda body: {**body, "wallet": "0x" + "g" * 40}, "invalid_address",
     "wallet"),
    ("wallet short", lambda body: {**body, "wallet": "0x1234"}, "invalid_address", "wallet"),
    ("wallet number", lambda body: {**body, "wallet": 5}, "invalid_address", "wallet"),
    ("wallet newline", lambda body: {**body, "wallet": body["wallet"] + "\n"},
     "invalid_address", "wallet"),
    ("bad checksum", lambda body: {**body, "smartAccount": OK_ADDRESS[:-1] + "e"},
     "invalid_address_checksum", "smartAccount"),
    ("zero session key", lambda body: {**body, "sessionKey": "0x" + "0" * 40},
     "invalid_address", "sessionKey"),
    ("chainId string", lambda body: {**body, "chainId": "31337"}, "invalid_type", "chainId"),
    ("chainId bool", lambda body: {**body, "chainId": True}, "invalid_type", "chainId"),
    ("chainId huge", lambda body: {**body, "chainId": 2**53}, "integer_out_of_range",
     "chainId"),
    ("issuedAt float", lambda body: {**body, "issuedAt": 1.5}, "invalid_type", "issuedAt"),
    ("expiresAt negative", lambda body: {**body, "expiresAt": -1}, "integer_out_of_range",
     "expiresAt"),
    ("nonce empty", lambda body: {**body, "nonce": ""}, "invalid_nonce", "nonce"),
    ("nonce too long", lambda body: {**body, "nonce": "a" * 81}, "invalid_nonce", "nonce"),
    ("nonce unicode", lambda body: {**body, "nonce": "caf\u00e9"}, "invalid_nonce", "nonce"),
    ("nonce number", lambda body: {**body, "nonce": 7}, "invalid_nonce", "nonce"),
])
async def test_malformed_bodies_are_400_naming_the_field(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, name: str, edit: Any,
    code: str, param: str | None,
) -> None:
    wallet = new_wallet()
    body = message(wallet)
    status, answer, _ = await post_authorization(http, tollgate.url, edit(body),
                                                 sign(wallet, body))
    error = assert_error(status, answer, 400, code, param)
    assert error["type"] == "invalid_request_error"


async def test_a_checksummed_address_is_accepted(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet, sessionKey=OK_ADDRESS)
    status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                 sign(wallet, body))
    assert status == 201, answer


async def test_invalid_json_and_oversized_bodies(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    url = f"{tollgate.url}/v1/authorize"
    async with http.post(url, data=b"{", headers={
            "Content-Type": "application/json", SIGNATURE_HEADER: "0x00"}) as response:
        assert_error(response.status, await response.json(), 400, "invalid_json")
    async with http.post(url, data=b"{" + b" " * 5000 + b"}") as response:
        assert_error(response.status, await response.json(), 413, "request_too_large")

    async def chunked() -> Any:  # no Content-Length: the bound holds while reading
        for _ in range(10):
            yield b" " * 1000

    async with http.post(url, data=chunked()) as response:
        assert_error(response.status, await response.json(), 413, "request_too_large")


async def test_suspended_account_gets_no_session_and_its_tokens_stop(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    body = message(wallet)
    status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                 sign(wallet, body))
    assert status == 201
    account_id = int(answer["account"]["id"].removeprefix("acct_"))
    async with tollgate.app[DATABASE].begin() as connection:
        await connection.execute(sa.update(accounts).where(accounts.c.id == account_id)
                                 .values(status="suspended"))
    # The token was never used, so no instance has its account row cached.
    async with http.post(f"{tollgate.v1}/chat/completions", json=HELLO,
                                   headers=bearer(answer["token"])) as response:
        error = assert_error(response.status, await response.json(), 403, "account_suspended")
        assert error["type"] == "permission_error"
    again = message(wallet)
    status, refused, _ = await post_authorization(http, tollgate.url, again,
                                                  sign(wallet, again))
    assert_error(status, refused, 403, "account_suspended")
    async with tollgate.app[DATABASE].connect() as connection:
        spent = await connection.scalar(sa.select(sa.func.count()).select_from(
            authorization_nonces).where(authorization_nonces.c.nonce == again["nonce"]))
    assert spent == 0, "a refused authorization rolls back, nonce included"


async def test_a_cached_row_in_use_is_reloaded_in_the_background(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    """A row over REFRESH_AFTER_S old still serves, and its reload catches a suspension
    before the TTL would have: steady callers never wait for Postgres."""
    wallet = new_wallet()
    body = message(wallet)
    status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                 sign(wallet, body))
    assert status == 201
    identity = tollgate.app[SESSIONS]
    now = [1000.0]
    identity.cache.clock = lambda: now[0]
    try:
        await identity.authenticate(answer["token"])
        account_id = int(answer["account"]["id"].removeprefix("acct_"))
        async with tollgate.app[DATABASE].begin() as connection:
            await connection.execute(sa.update(accounts).where(accounts.c.id == account_id)
                                     .values(status="suspended"))
        now[0] += REFRESH_AFTER_S / 2
        await identity.authenticate(answer["token"])
        assert identity.reloads == (), "a young row is not reloaded"
        now[0] += REFRESH_AFTER_S
        principal = await identity.authenticate(answer["token"])
        assert principal.account_id == account_id, "the aging row still served this call"
        reloads = identity.reloads
        assert len(reloads) == 1
        await asyncio.gather(*reloads)
        with pytest.raises(PermissionDenied) as refused:
            await identity.authenticate(answer["token"])
        assert refused.value.code == "account_suspended"
        assert now[0] - 1000.0 < CACHE_TTL_S, "refused before the first row would expire"
    finally:
        identity.cache.clock = time.monotonic


class CountingLoads:
    """Wraps the real ``SessionStore.load``: counts reads, and can hold them at a gate."""

    def __init__(self, load: Any) -> None:
        self.load = load
        self.reads = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def __call__(self, jti: str) -> Any:
        self.reads += 1
        self.started.set()
        await self.gate.wait()
        return await self.load(jti)


async def test_concurrent_misses_of_a_session_share_one_read(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    """A burst after a pause (64 calls, no cached row) reads the row once; a caller that
    leaves does not cancel the read for the others; a drop starts a fresh read."""
    wallet = new_wallet()
    body = message(wallet)
    status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                 sign(wallet, body))
    assert status == 201
    identity = tollgate.app[SESSIONS]
    identity.cache.clear()
    loads = CountingLoads(identity.store.load)
    identity.store.load = loads  # type: ignore[method-assign]
    try:
        loads.gate.clear()
        burst = [asyncio.ensure_future(identity.authenticate(answer["token"]))
                 for _ in range(64)]
        await loads.started.wait()
        burst[0].cancel()  # its client went away while the row was being read
        loads.gate.set()
        principals = await asyncio.gather(*burst[1:])
        assert loads.reads == 1
        assert {principal.session_jti for principal in principals} == {answer["sessionId"]}
        assert burst[0].cancelled()
        assert identity.cache.get(answer["sessionId"]) is not None, "the shared read is cached"

        # A read begun before a drop (a revocation) is not shared with later callers.
        identity.cache.clear()
        loads.gate.clear()
        loads.started.clear()
        before = asyncio.ensure_future(identity.authenticate(answer["token"]))
        await loads.started.wait()
        loads.started.clear()
        identity.cache.drop(answer["sessionId"])
        after = asyncio.ensure_future(identity.authenticate(answer["token"]))
        await loads.started.wait()
        loads.gate.set()
        await asyncio.gather(before, after)
        assert loads.reads == 3
    finally:
        del identity.store.load
        loads.gate.set()


async def test_schema_is_enough_to_sign(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    async with http.get(f"{tollgate.url}/v1/authorize/schema") as response:
        assert response.status == 200
        schema = await response.json()
    assert schema["primaryType"] == "Authorization"
    assert schema["domains"] == [{"name": "Tollgate", "version": "1", "chainId": 31337}]
    assert set(schema["fields"]) == {field["name"] for field in schema["types"]["Authorization"]}
    assert schema["signature"]["header"] == SIGNATURE_HEADER
    assert schema["limits"]["session_ttl_max_s"] == 7 * 24 * 3600
    assert schema["token"] == {"type": "Bearer", "algorithm": "HS256", "issuer": "tollgate",
                               "audience": "tollgate-api"}
    # A client that knows only the schema signs something the server accepts.
    wallet = new_wallet()
    body = message(wallet)
    signed = wallet.sign_typed_data(full_message={
        "types": schema["types"], "primaryType": schema["primaryType"],
        "domain": schema["domains"][0], "message": body,
    })
    status, answer, _ = await post_authorization(http, tollgate.url, body,
                                                 "0x" + bytes(signed.signature).hex())
    assert status == 201, answer
