"""GET /v1/models and /v1/models/{id}: the OpenAI list shape plus prices and limits.

Prices are decimal strings (USD per one million tokens), never floats.
"""

from __future__ import annotations

from decimal import Decimal

from aiohttp import web

from app.config.catalog import MICROS_PER_USD, Model
from app.errors import NotFound
from app.http.keys import CATALOG

# The catalog is loaded at start; a fixed created time keeps the list stable.
CATALOG_CREATED = 1_700_000_000


def _usd(micros: int) -> str:
    return str((Decimal(micros) / MICROS_PER_USD).normalize()) if micros else "0"


def model_object(model: Model) -> dict[str, object]:
    return {
        "id": model.id,
        "object": "model",
        "created": CATALOG_CREATED,
        "owned_by": model.owned_by,
        "context_length": model.context_length,
        "max_output_tokens": model.max_output_tokens,
        "pricing": {
            "unit": "USD per 1M tokens",
            "input": _usd(model.price.input_per_mtok_micros),
            "output": _usd(model.price.output_per_mtok_micros),
            "cached_input": _usd(model.price.cached_input_per_mtok_micros),
        },
        "providers": [route.provider.name for route in model.routes],
    }


async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    return web.json_response(
        {"object": "list", "data": [model_object(m) for m in catalog.models.values()]}
    )


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    model = request.app[CATALOG].models.get(model_id)
    if model is None:
        raise NotFound(f"the model '{model_id}' does not exist", param="model",
                       code="model_not_found")
    return web.json_response(model_object(model))
