"""The operator's catalog: providers, models, their routes and prices.

The catalog is a TOML file (``TOLLGATE_CATALOG`` or ``--catalog``; the sample in
``app/sample_catalog.toml`` otherwise). Prices are written as decimal USD per
one million tokens (``"0.15"``) and held as integer micro-USD per million tokens,
so no float ever touches money. A price with more than six decimals is refused
rather than rounded.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_CATALOG_PATH = Path(__file__).resolve().parent.parent / "sample_catalog.toml"
MICROS_PER_USD = 1_000_000
BUILTIN_MOCK = "mock"


class CatalogError(Exception):
    """The catalog file is missing, unreadable or inconsistent."""


@dataclass(frozen=True, slots=True)
class Provider:
    """An OpenAI-compatible upstream."""

    name: str
    base_url: str
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    builtin: str | None = None
    connect_timeout_s: float = 5.0
    # Until a stream's first event (non-streaming: until the whole body) arrives.
    first_byte_timeout_s: float = 120.0
    # Longest upstream silence tolerated in a stream (any bytes end a silence).
    idle_timeout_s: float = 120.0
    total_timeout_s: float = 900.0
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Price:
    """Integer micro-USD per one million tokens."""

    input_per_mtok_micros: int
    output_per_mtok_micros: int
    cached_input_per_mtok_micros: int


@dataclass(frozen=True, slots=True)
class Route:
    """One way to serve a model: a provider and its own model id."""

    provider: Provider
    upstream_model: str


@dataclass(frozen=True, slots=True)
class Model:
    """A public model id and the routes that can serve it, in preference order."""

    id: str
    routes: tuple[Route, ...]
    price: Price
    context_length: int
    max_output_tokens: int
    owned_by: str = "tollgate"


@dataclass(frozen=True, slots=True)
class Catalog:
    """Providers and models that are usable in this process."""

    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    skipped_providers: tuple[str, ...] = ()

    @property
    def uses_builtin_mock(self) -> bool:
        return any(p.builtin == BUILTIN_MOCK for p in self.providers.values())

    def with_builtin_url(self, builtin: str, base_url: str) -> Catalog:
        """Point every provider of kind ``builtin`` at ``base_url`` (known only once started)."""
        providers = {
            name: replace(p, base_url=base_url) if p.builtin == builtin else p
            for name, p in self.providers.items()
        }
        models = {
            model_id: replace(
                m,
                routes=tuple(replace(r, provider=providers[r.provider.name]) for r in m.routes),
            )
            for model_id, m in self.models.items()
        }
        return Catalog(providers, models, self.skipped_providers)


def parse_price_micros(value: object, where: str) -> int:
    """Turn a decimal USD string (or integer) into integer micro-USD, exactly."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CatalogError(f"{where}: price must be a decimal string like \"0.15\"")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise CatalogError(f"{where}: {value!r} is not a decimal number") from None
    micros = amount * MICROS_PER_USD
    if not amount.is_finite() or amount < 0 or micros != micros.to_integral_value():
        raise CatalogError(f"{where}: {value!r} must be >= 0 with at most 6 decimals")
    return int(micros)


def load_catalog(path: Path | None, environ: Mapping[str, str] | None = None) -> Catalog:
    """Read and check the catalog, keeping only providers whose key is present.

    A provider whose ``api_key_env`` is unset in the environment is skipped with
    a warning. Builtin mock providers are used only when no other provider is
    left, so a production catalog that lists them never serves mock answers.
    """
    environ = os.environ if environ is None else environ
    path = path or SAMPLE_CATALOG_PATH
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"catalog file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise CatalogError(f"catalog {path}: {error}") from None
    return build_catalog(raw, environ, source=str(path))


def build_catalog(raw: Mapping[str, Any], environ: Mapping[str, str], source: str) -> Catalog:
    declared = _parse_providers(raw.get("providers", {}), source)
    usable, skipped = _usable_providers(declared, environ)
    models = _parse_models(raw.get("models", []), declared, usable, source)
    return Catalog(usable, models, tuple(skipped))


def _parse_providers(raw: Any, source: str) -> dict[str, Provider]:
    if not isinstance(raw, dict):
        raise CatalogError(f"{source}: [providers] must be a table")
    providers = {}
    known = set(Provider.__dataclass_fields__) - {"name", "api_key"}
    for name, spec in raw.items():
        where = f"{source}: providers.{name}"
        if not isinstance(spec, dict):
            raise CatalogError(f"{where} must be a table")
        unknown = set(spec) - known
        if unknown:
            raise CatalogError(f"{where}: unknown keys {sorted(unknown)}")
        builtin = spec.get("builtin")
        if builtin not in (None, BUILTIN_MOCK):
            raise CatalogError(f"{where}: builtin must be \"{BUILTIN_MOCK}\"")
        base_url = spec.get("base_url", "")
        if builtin is None and not str(base_url).startswith(("http://", "https://")):
            raise CatalogError(f"{where}: base_url must be an http(s) URL")
        try:
            provider = Provider(
                name=name,
                base_url=str(base_url).rstrip("/"),
                api_key_env=spec.get("api_key_env"),
                builtin=builtin,
                connect_timeout_s=float(spec.get("connect_timeout_s", 5.0)),
                first_byte_timeout_s=float(spec.get("first_byte_timeout_s", 120.0)),
                idle_timeout_s=float(spec.get("idle_timeout_s", 120.0)),
                total_timeout_s=float(spec.get("total_timeout_s", 900.0)),
                headers=dict(spec.get("headers", {})),
            )
        except (TypeError, ValueError) as error:
            raise CatalogError(f"{where}: {error}") from None
        timeouts = (
            provider.connect_timeout_s,
            provider.first_byte_timeout_s,
            provider.idle_timeout_s,
            provider.total_timeout_s,
        )
        if min(timeouts) <= 0:
            raise CatalogError(f"{where}: timeouts must be > 0")
        providers[name] = provider
    return providers


def _usable_providers(
    declared: Mapping[str, Provider], environ: Mapping[str, str]
) -> tuple[dict[str, Provider], list[str]]:
    usable: dict[str, Provider] = {}
    skipped: list[str] = []
    for name, provider in declared.items():
        if provider.builtin is not None:
            continue
        if provider.api_key_env is None:
            usable[name] = provider
        elif environ.get(provider.api_key_env):
            usable[name] = replace(provider, api_key=environ[provider.api_key_env])
        else:
            log.warning("provider %s skipped: %s is not set", name, provider.api_key_env)
            skipped.append(name)
    if not usable:
        usable = {n: p for n, p in declared.items() if p.builtin == BUILTIN_MOCK}
    return usable, skipped


def _parse_models(
    raw: Any,
    declared: Mapping[str, Provider],
    usable: Mapping[str, Provider],
    source: str,
) -> dict[str, Model]:
    if not isinstance(raw, list):
        raise CatalogError(f"{source}: models must be an array of tables ([[models]])")
    models: dict[str, Model] = {}
    for index, spec in enumerate(raw):
        where = f"{source}: models[{index}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("id"), str) or not spec["id"]:
            raise CatalogError(f"{where} needs a string id")
        model_id = spec["id"]
        where = f"{source}: model {model_id}"
        if model_id in models:
            raise CatalogError(f"{where} is declared twice")
        routes = []
        for route in spec.get("routes", []):
            provider_name = route.get("provider")
            if provider_name not in declared:
                raise CatalogError(f"{where}: route names unknown provider {provider_name!r}")
            if provider_name in usable:
                upstream = route.get("model", model_id)
                routes.append(Route(usable[provider_name], str(upstream)))
        price_spec = spec.get("price", {})
        price = Price(
            parse_price_micros(price_spec.get("input"), f"{where} price.input"),
            parse_price_micros(price_spec.get("output"), f"{where} price.output"),
            parse_price_micros(
                price_spec.get("cached_input", price_spec.get("input")),
                f"{where} price.cached_input",
            ),
        )
        context_length = spec.get("context_length")
        max_output = spec.get("max_output_tokens")
        if not isinstance(context_length, int) or context_length < 1:
            raise CatalogError(f"{where}: context_length must be a positive integer")
        if not isinstance(max_output, int) or not 1 <= max_output <= context_length:
            raise CatalogError(f"{where}: max_output_tokens must be in 1..context_length")
        if routes:
            models[model_id] = Model(
                model_id, tuple(routes), price, context_length, max_output,
                owned_by=str(spec.get("owned_by", routes[0].provider.name)),
            )
    return models
