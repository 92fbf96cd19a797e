"""The catalog: the shipped sample parses, prices are exact, mistakes are explained."""

from __future__ import annotations

from typing import Any

import pytest

from app.config.catalog import CatalogError, build_catalog, load_catalog, parse_price_micros


def test_sample_catalog_without_keys_serves_only_the_mock() -> None:
    catalog = load_catalog(None, environ={})
    assert set(catalog.providers) == {"mock"}
    assert set(catalog.models) == {"mock-gpt", "mock-gpt-mini"}
    assert "openai" in catalog.skipped_providers


def test_sample_catalog_with_a_key_skips_the_mock() -> None:
    catalog = load_catalog(None, environ={"OPENAI_API_KEY": "sk-x"})
    assert set(catalog.providers) == {"openai"}
    assert "gpt-4o-mini" in catalog.models and "mock-gpt" not in catalog.models
    assert catalog.providers["openai"].api_key == "sk-x"
    assert "sk-x" not in repr(catalog.providers["openai"])
    price = catalog.models["gpt-4o-mini"].price
    assert (price.input_per_mtok_micros, price.output_per_mtok_micros,
            price.cached_input_per_mtok_micros) == (150_000, 600_000, 75_000)


def test_openrouter_key_serves_every_real_model() -> None:
    catalog = load_catalog(None, environ={"OPENROUTER_API_KEY": "k"})
    assert {"gpt-4o", "claude-sonnet-4", "gemini-2.5-pro", "llama-3.3-70b-instruct"} <= set(
        catalog.models)


@pytest.mark.parametrize(("text", "micros"), [
    ("0.15", 150_000), ("2.50", 2_500_000), ("0.000001", 1), ("0", 0), (3, 3_000_000)])
def test_exact_prices(text: str | int, micros: int) -> None:
    assert parse_price_micros(text, "x") == micros


@pytest.mark.parametrize("text", ["0.0000001", "-1", "abc", "NaN", 0.15, None, True])
def test_bad_prices(text: Any) -> None:
    with pytest.raises(CatalogError):
        parse_price_micros(text, "x")


GOOD_MODEL = {"id": "m", "context_length": 10, "max_output_tokens": 5,
              "price": {"input": "1", "output": "1"}, "routes": [{"provider": "p"}]}


@pytest.mark.parametrize(("document", "message"), [
    ({"providers": {"p": {"base_url": "ftp://x"}}}, "base_url"),
    ({"providers": {"p": {"base_url": "http://x", "colour": 1}}}, "unknown keys"),
    ({"providers": {"p": {"base_url": "http://x", "connect_timeout_s": 0}}}, "timeouts"),
    ({"providers": {"p": {"base_url": "http://x"}},
      "models": [{**GOOD_MODEL, "routes": [{"provider": "q"}]}]}, "unknown provider"),
    ({"providers": {"p": {"base_url": "http://x"}},
      "models": [GOOD_MODEL, GOOD_MODEL]}, "declared twice"),
    ({"providers": {"p": {"base_url": "http://x"}},
      "models": [{**GOOD_MODEL, "max_output_tokens": 11}]}, "max_output_tokens"),
])
def test_catalog_mistakes_are_explained(document: dict[str, Any], message: str) -> None:
    with pytest.raises(CatalogError) as error:
        build_catalog(document, {}, source="test.toml")
    assert message in str(error.value)
    assert "test.toml" in str(error.value)


def test_missing_file(tmp_path: Any) -> None:
    with pytest.raises(CatalogError):
        load_catalog(tmp_path / "none.toml")
