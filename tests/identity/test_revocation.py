"""Revoking sessions: at once on every instance, by the account itself or by the operator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis

from app.config.catalog import Catalog
from app.errors import AuthenticationFailed
from app.http.app import Backends
from app.identity.revocation_list import revoked_key
from app.identity.sessions import SESSIONS
from tests.conftest import MockUpstream, RunningTollgate, make_settings, start_tollgate
from tests.identity.conftest import assert_error, assert_token_refused
from tests.identity.test_tokens import chat
from tests.identity.wallets import authorize, bearer, new_wallet

ADMIN_TOKEN = "admin-" + "9" * 40


@pytest.fixture(scope="module")
async def second(catalog: Catalog, backends: Backends) -> AsyncIterator[RunningTollgate]:
    """Another Tollgate instance on the same Postgres and Redis, with an admin token."""
    running = await start_tollgate(make_settings(admin_token=ADMIN_TOKEN), catalog, backends)
    yield running
    await running.runner.cleanup()


async def delete(http: aiohttp.ClientSession, url: str, token: str
                 ) -> tuple[int, dict[str, Any]]:
    async with http.delete(url, headers=bearer(token)) as response:
        return response.status, await response.json()


async def live(http: aiohttp.ClientSession, running: RunningTollgate, wallet: str) -> bool:
    async with http.get(f"{running.url}/v1/authorize/check",
                        params={"wallet": wallet}) as response:
        assert response.status == 200
        answer = await response.json()
    assert set(answer) == {"object", "wallet", "has_live_session"}
    return bool(answer["has_live_session"])


async def test_revocation_is_refused_at_once_by_another_instance(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, second: RunningTollgate,
    redis_url: str,
) -> None:
    issued = await authorize(http, tollgate.url)
    token = issued["token"]
    # Both instances accept it, and now both have its account row cached.
    for running in (tollgate, second):
        status, body, _ = await chat(http, running, bearer(token))
        assert status == 200, body

    status, answer = await delete(http, f"{tollgate.url}/v1/authorize", token)
    assert status == 200, answer
    assert answer == {"object": "session.revocation", "revoked": [issued["sessionId"]]}

    for running in (second, tollgate):
        status, body, headers = await chat(http, running, bearer(token))
        assert_token_refused(status, body, headers, "token_revoked")
    status, answer = await delete(http, f"{second.url}/v1/authorize", token)
    assert_error(status, answer, 401, "token_revoked")

    client = redis.Redis.from_url(redis_url)
    try:
        ttl_s = await client.ttl(revoked_key(issued["sessionId"]))
    finally:
        await client.aclose()
    assert 3600 - 5 < ttl_s <= 3600 + 60, "kept until the token could no longer verify"


async def test_revoke_all_ends_every_session_of_the_account_only(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, second: RunningTollgate
) -> None:
    wallet, neighbour = new_wallet(), new_wallet()
    sessions = [await authorize(http, tollgate.url, wallet) for _ in range(3)]
    theirs = await authorize(http, tollgate.url, neighbour)
    assert await live(http, tollgate, wallet.address)

    status, answer = await delete(http, f"{second.url}/v1/authorize/sessions",
                                  sessions[0]["token"])
    assert status == 200, answer
    assert answer["object"] == "session.revocation"
    assert sorted(answer["revoked"]) == sorted(s["sessionId"] for s in sessions)
    for session in sessions:
        status, body, headers = await chat(http, tollgate, bearer(session["token"]))
        assert_token_refused(status, body, headers, "token_revoked")
    status, body, _ = await chat(http, tollgate, bearer(theirs["token"]))
    assert status == 200, "another account's session is untouched"
    assert not await live(http, second, wallet.address)
    assert await live(http, second, neighbour.address)


async def test_one_account_cannot_revoke_another_accounts_session(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    mine = await authorize(http, tollgate.url, wallet)
    also_mine = await authorize(http, tollgate.url, wallet)
    theirs = await authorize(http, tollgate.url)
    base = f"{tollgate.url}/v1/authorize/sessions"

    status, answer = await delete(http, f"{base}/{theirs['sessionId']}",
                                  mine["token"])
    assert_error(status, answer, 404, "session_not_found", "session_id")
    status, answer = await delete(http, f"{base}/not-a-session-id", mine["token"])
    assert_error(status, answer, 404, "session_not_found")
    status, body, _ = await chat(http, tollgate, bearer(theirs["token"]))
    assert status == 200, "their session still works"

    # One's own other session, by id: revoked, and asking again is not an error.
    for _ in range(2):
        status, answer = await delete(http, f"{base}/{also_mine['sessionId']}",
                                      mine["token"])
        assert status == 200, answer
        assert answer["revoked"] == [also_mine["sessionId"]]
    status, body, headers = await chat(http, tollgate, bearer(also_mine["token"]))
    assert_token_refused(status, body, headers, "token_revoked")
    status, body, _ = await chat(http, tollgate, bearer(mine["token"]))
    assert status == 200, body


async def test_revocation_needs_a_token(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    for path in ("/v1/authorize", "/v1/authorize/sessions", "/v1/authorize/sessions/" + "a" * 32):
        async with http.delete(f"{tollgate.url}{path}") as response:
            assert_error(response.status, await response.json(), 401, "missing_token")


async def test_admin_revokes_every_session_of_a_wallet(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, second: RunningTollgate
) -> None:
    wallet = new_wallet()
    sessions = [await authorize(http, tollgate.url, wallet) for _ in range(2)]
    bystander = await authorize(http, tollgate.url)
    url = f"{second.url}/admin/wallets/{wallet.address}/revoke"

    for presented, code in [({}, "missing_token"),
                            (bearer("wrong"), "invalid_admin_token"),
                            (bearer(sessions[0]["token"]), "invalid_admin_token")]:
        async with http.post(url, headers=presented) as response:
            assert_error(response.status, await response.json(), 401, code)
            assert response.headers["WWW-Authenticate"].startswith('Bearer realm="tollgate"')
    async with http.post(f"{second.url}/admin/wallets/0x12/revoke",
                                   headers=bearer(ADMIN_TOKEN)) as response:
        assert_error(response.status, await response.json(), 400, "invalid_address", "wallet")

    async with http.post(url, headers=bearer(ADMIN_TOKEN)) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["object"] == "session.revocation"
    assert answer["wallet"] == wallet.address.lower()
    assert sorted(answer["revoked"]) == sorted(s["sessionId"] for s in sessions)
    for session in sessions:
        status, body, headers = await chat(http, tollgate, bearer(session["token"]))
        assert_token_refused(status, body, headers, "token_revoked")
    status, body, _ = await chat(http, tollgate, bearer(bystander["token"]))
    assert status == 200, body

    # The wallet may open a new session afterwards.
    fresh = await authorize(http, tollgate.url, wallet)
    status, body, _ = await chat(http, second, bearer(fresh["token"]))
    assert status == 200, body


async def test_admin_endpoints_do_not_exist_without_an_admin_token(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    async with http.post(
        f"{tollgate.url}/admin/wallets/{new_wallet().address}/revoke",
        headers=bearer(ADMIN_TOKEN),
    ) as response:
        assert_error(response.status, await response.json(), 404, "unknown_url")


async def test_check_endpoint(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    wallet = new_wallet()
    assert not await live(http, tollgate, wallet.address)
    await authorize(http, tollgate.url, wallet)
    assert await live(http, tollgate, wallet.address.lower())
    async with http.get(f"{tollgate.url}/v1/authorize/check",
                                  params={"wallet": wallet.address}) as response:
        answer = await response.json()
    assert answer == {"object": "wallet.session_status", "wallet": wallet.address.lower(),
                      "has_live_session": True}, "nothing about money"
    queries: list[tuple[Any, str]] = [
        ({}, "missing_parameter"), ({"wallet": "0xnope"}, "invalid_address"),
        ([("wallet", wallet.address), ("wallet", wallet.address)], "invalid_parameter"),
    ]
    for query, code in queries:
        async with http.get(f"{tollgate.url}/v1/authorize/check",
                                      params=query) as response:
            assert_error(response.status, await response.json(), 400, code, "wallet")


async def test_without_redis_postgres_decides(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, catalog: Catalog,
    postgres_url: str,
) -> None:
    """An instance whose Redis is down still refuses revoked sessions and serves live ones."""
    live_session = await authorize(http, tollgate.url)
    revoked_session = await authorize(http, tollgate.url)
    status, _ = await delete(http, f"{tollgate.url}/v1/authorize",
                             revoked_session["token"])
    assert status == 200
    # The discard port: nothing listens, so every Redis call fails at once.
    blind = await start_tollgate(make_settings(), catalog,
                                 Backends(postgres_url, "redis://127.0.0.1:9/0"))
    try:
        sessions = blind.app[SESSIONS]
        principal = await sessions.authenticate(live_session["token"])
        assert principal.session_jti == live_session["sessionId"]
        with pytest.raises(AuthenticationFailed) as refused:
            await sessions.authenticate(revoked_session["token"])
        assert refused.value.code == "token_revoked"
        # Revoking still works: Postgres is written, Redis is skipped with an error log.
        status, answer = await delete(http, f"{blind.url}/v1/authorize",
                                      live_session["token"])
        assert status == 200, answer
        with pytest.raises(AuthenticationFailed) as refused:
            await sessions.authenticate(live_session["token"])
        assert refused.value.code == "token_revoked"
    finally:
        await blind.runner.cleanup()


SLOW = {"model": "test-model", "messages": [{"role": "user", "content": "Hello"}],
        "provider": {"only": ["mock"]}, "mock": {"latency_ms": 3000}}


async def mock_stats(http: aiohttp.ClientSession, mock_upstream: MockUpstream) -> Any:
    async with http.get(f"{mock_upstream.root}/mock/stats") as response:
        return await response.json()


async def test_a_session_revoked_elsewhere_is_refused_before_anything_is_forwarded(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, second: RunningTollgate,
    mock_upstream: MockUpstream,
) -> None:
    """The revocation feed dropped the cached row: the next request is checked in full."""
    feed = tollgate.app[SESSIONS].feed
    assert feed is not None
    await feed.wait_live()
    issued = await authorize(http, tollgate.url)
    token = issued["token"]
    status, body, _ = await chat(http, tollgate, bearer(token))
    assert status == 200, body  # Its row is now cached here.
    assert tollgate.app[SESSIONS].cache.get(issued["sessionId"]) is not None
    heard = feed.revocations_heard
    status, answer = await delete(http, f"{second.url}/v1/authorize", token)
    assert status == 200, answer
    # Redis sends the message before it answers the PUBLISH; in one process the feed
    # has read it by now, and across processes within its delivery time.
    assert feed.revocations_heard == heard + 1
    assert tollgate.app[SESSIONS].cache.get(issued["sessionId"]) is None
    before = await mock_stats(http, mock_upstream)
    async with http.post(f"{tollgate.v1}/chat/completions", json=SLOW,
                         headers=bearer(token)) as response:
        assert_token_refused(response.status, await response.json(), response.headers,
                             "token_revoked")
    assert (await mock_stats(http, mock_upstream))["requests"] == before["requests"]


async def test_a_warm_session_is_admitted_without_redis_while_the_feed_is_live(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    feed = tollgate.app[SESSIONS].feed
    assert feed is not None
    await feed.wait_live()
    issued = await authorize(http, tollgate.url)
    status, body, _ = await chat(http, tollgate, bearer(issued["token"]))
    assert status == 200, body
    revocations = tollgate.app[SESSIONS].revocations
    asked: list[str] = []
    original = revocations.ask
    revocations.ask = lambda jti: asked.append(jti) or original(jti)  # type: ignore[method-assign]
    try:
        status, body, _ = await chat(http, tollgate, bearer(issued["token"]))
        assert status == 200, body
        assert asked == [], "a cached row and a live feed: Redis is not asked"
        await feed.stop()
        status, body, _ = await chat(http, tollgate, bearer(issued["token"]))
        assert status == 200, body
        assert asked == [issued["sessionId"]], "without the feed every request asks Redis"
    finally:
        del revocations.ask
        feed.start()
        await feed.wait_live()


async def test_a_broken_feed_reconnects_and_trusts_nothing_cached_across_the_gap(
    tollgate: RunningTollgate, redis_url: str
) -> None:
    sessions = tollgate.app[SESSIONS]
    feed = sessions.feed
    assert feed is not None
    await feed.wait_live()
    subscriptions, generation = feed.subscriptions, sessions.cache.generation
    client = redis.Redis.from_url(redis_url)
    try:
        assert await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    finally:
        await client.aclose()
    await asyncio.wait_for(feed.wait_live(subscriptions + 1), 10)
    assert feed.live and sessions.cache.generation > generation, "the cache was cleared"


async def test_while_the_feed_is_down_a_revoked_session_costs_at_most_one_cancelled_call(
    http: aiohttp.ClientSession, tollgate: RunningTollgate, second: RunningTollgate,
    mock_upstream: MockUpstream,
) -> None:
    """Without the feed, a session seen moments ago is let in while Redis is asked
    (authenticate_early): the revocation still wins, cancels the upstream request, and
    the session's next request is checked in full before anything is forwarded."""
    feed = tollgate.app[SESSIONS].feed
    assert feed is not None
    await feed.stop()
    try:
        issued = await authorize(http, tollgate.url)
        token = issued["token"]
        status, body, _ = await chat(http, tollgate, bearer(token))
        assert status == 200, body  # Its row is now cached here.
        status, answer = await delete(http, f"{second.url}/v1/authorize", token)
        assert status == 200, answer
        before = await mock_stats(http, mock_upstream)
        for attempt in range(2):
            async with http.post(f"{tollgate.v1}/chat/completions", json=SLOW,
                                 headers=bearer(token)) as response:
                assert_token_refused(response.status, await response.json(),
                                     response.headers, "token_revoked")
            async with http.get(f"{mock_upstream.root}/mock/wait", params={
                    "requests": before["requests"] + 1, "cancelled": before["cancelled"] + 1,
                    "timeout_s": 5}) as waited:
                assert waited.status == 200, "the overlapped upstream call was cancelled"
                seen = await waited.json()
            assert seen["requests"] == before["requests"] + 1, f"attempt {attempt}: asked once"
    finally:
        feed.start()
        await feed.wait_live()
