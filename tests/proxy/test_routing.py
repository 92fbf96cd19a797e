"""Route plans from model ids, fallback lists and provider preferences."""

from __future__ import annotations

from typing import Any

import pytest

from app.config.catalog import Catalog, build_catalog
from app.errors import InvalidRequest, NotFound
from app.proxy.chat_request import parse_chat_request
from app.proxy.routing import plan_routes

PRICE = {"input": "1", "output": "2"}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    providers = {name: {"base_url": f"http://{name}.test/v1"} for name in ("a", "b", "c")}
    models = [
        {"id": "m1", "context_length": 1000, "max_output_tokens": 100, "price": PRICE,
         "routes": [{"provider": "a", "model": "a-m1"}, {"provider": "b", "model": "b-m1"},
                    {"provider": "c", "model": "c-m1"}]},
        {"id": "m2", "context_length": 1000, "max_output_tokens": 50, "price": PRICE,
         "routes": [{"provider": "c", "model": "c-m2"}]},
        {"id": "org/m3", "context_length": 1000, "max_output_tokens": 100, "price": PRICE,
         "routes": [{"provider": "b", "model": "b-m3"}]},
    ]
    return build_catalog({"providers": providers, "models": models}, {}, source="test")


def plan(catalog: Catalog, **fields: Any) -> list[tuple[str, str]]:
    body = {"messages": [{"role": "user", "content": "x"}], **fields}
    request = parse_chat_request(body, max_messages=10, max_n=4)
    return [(c.model.id, c.route.provider.name) for c in plan_routes(catalog, request)]


def test_catalog_order(catalog: Catalog) -> None:
    assert plan(catalog, model="m1") == [("m1", "a"), ("m1", "b"), ("m1", "c")]


def test_provider_pin(catalog: Catalog) -> None:
    assert plan(catalog, model="b/m1") == [("m1", "b")]


def test_model_id_with_slash_is_not_a_pin(catalog: Catalog) -> None:
    assert plan(catalog, model="org/m3") == [("org/m3", "b")]


def test_pin_to_provider_without_route(catalog: Catalog) -> None:
    with pytest.raises(NotFound) as error:
        plan(catalog, model="a/m2")
    assert error.value.param == "model"


def test_models_fallback_list(catalog: Catalog) -> None:
    assert plan(catalog, model="m2", models=["m2", "b/m1"]) == [("m2", "c"), ("m1", "b")]


def test_fallback_model_that_cannot_honour_max_tokens_is_skipped(catalog: Catalog) -> None:
    assert plan(catalog, model="m1", models=["m2"], max_tokens=80) == [
        ("m1", "a"), ("m1", "b"), ("m1", "c")]


def test_order_only_ignore(catalog: Catalog) -> None:
    assert plan(catalog, model="m1", provider={"order": ["c", "a"]}) == [
        ("m1", "c"), ("m1", "a"), ("m1", "b")]
    assert plan(catalog, model="m1", provider={"only": ["b", "c"]}) == [("m1", "b"), ("m1", "c")]
    assert plan(catalog, model="m1", provider={"ignore": ["a"]}) == [("m1", "b"), ("m1", "c")]
    assert plan(catalog, model="m1", provider={"order": ["c"], "allow_fallbacks": False}) == [
        ("m1", "c")]
    assert plan(catalog, model="m1", provider={"allow_fallbacks": False}) == [("m1", "a")]


def test_preferences_that_leave_nothing(catalog: Catalog) -> None:
    with pytest.raises(InvalidRequest) as error:
        plan(catalog, model="m1", provider={"only": ["z"]})
    assert error.value.param == "provider"
