"""Models list, health checks and metrics."""

from __future__ import annotations

import aiohttp

from tests.conftest import RunningTollgate


async def test_models_list_has_prices_as_decimal_strings(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    async with http.get(f"{tollgate.v1}/models") as response:
        assert response.status == 200
        document = await response.json()
    assert document["object"] == "list"
    by_id = {model["id"]: model for model in document["data"]}
    assert "unset-model" not in by_id, "a provider without its key serves nothing"
    model = by_id["test-model"]
    assert model["object"] == "model"
    assert model["pricing"] == {"unit": "USD per 1M tokens", "input": "1", "output": "2",
                                "cached_input": "0.5"}
    assert model["context_length"] == 32768
    async with http.get(f"{tollgate.v1}/models/test-model") as response:
        assert (await response.json())["id"] == "test-model"
    async with http.get(f"{tollgate.v1}/models/none") as response:
        assert response.status == 404


async def test_health(http: aiohttp.ClientSession, tollgate: RunningTollgate) -> None:
    async with http.get(f"{tollgate.url}/health/live") as response:
        assert response.status == 200
    async with http.get(f"{tollgate.url}/health/ready") as response:
        assert response.status == 200
        assert (await response.json())["checks"] == {"postgres": "ok", "redis": "ok"}


async def test_metrics_count_requests_and_latency(
    http: aiohttp.ClientSession, tollgate: RunningTollgate
) -> None:
    body = {"model": "test-model", "messages": [{"role": "user", "content": "m"}],
            "stream": True, "provider": {"only": ["mock-b"]}}
    async with http.post(f"{tollgate.v1}/chat/completions", json=body) as response:
        await response.read()
    async with http.get(f"{tollgate.url}/metrics") as response:
        text = await response.text()
    for family in ("tollgate_requests_total", "tollgate_request_duration_seconds_bucket",
                   "tollgate_time_to_first_chunk_seconds_bucket", "tollgate_in_flight_requests",
                   "tollgate_tokens_total", "tollgate_http_responses_total"):
        assert family in text
    assert ('tollgate_requests_total{model="test-model",provider="mock-b",status="ok",'
            'streamed="true"}') in text
    assert ('tollgate_http_responses_total{code="200",route="/v1/chat/completions"}') in text
    in_flight = [line for line in text.splitlines()
                 if line.startswith("tollgate_in_flight_requests ")]
    assert in_flight == ["tollgate_in_flight_requests 0.0"]
