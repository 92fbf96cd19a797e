"""From a request's model, fallback models and provider preferences to an ordered route plan.

Resolution of one model id:
  1. an exact public id in the catalog;
  2. ``provider/model``: pins a catalog provider for a catalog model.
The plan is the primary model's routes, then each fallback model's, filtered by
``provider.only`` / ``provider.ignore``, ordered by ``provider.order``; with
``allow_fallbacks: false`` only the first route of each model is kept (or the
routes whose provider is in ``order``). Unknown provider names in preferences
are ignored, as OpenRouter does, because catalogs differ between deployments.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.config.catalog import Catalog, Model, Route
from app.errors import InvalidRequest, NotFound
from app.proxy.chat_request import ChatRequest, ProviderPreferences


@dataclass(frozen=True, slots=True)
class Candidate:
    """One attempt: the public model being sold and the route that serves it."""

    model: Model
    route: Route


def plan_routes(catalog: Catalog, request: ChatRequest) -> tuple[Candidate, ...]:
    """The ordered candidates for a request; raise 404/400 when there is none."""
    plan: list[Candidate] = []
    for position, model_id in enumerate((request.model, *request.fallback_models)):
        param = "model" if position == 0 else "models"
        model, routes = _resolve(catalog, model_id, param)
        routes = _apply_preferences(routes, request.provider)
        if position == 0:
            _check_output_limit(model, request)
        elif request.max_output_tokens and request.max_output_tokens > model.max_output_tokens:
            continue  # A fallback that cannot honour max_tokens is no fallback.
        plan.extend(Candidate(model, route) for route in routes)
    if not plan:
        raise InvalidRequest(
            f"no provider for model '{request.model}' satisfies the provider preferences",
            param="provider",
            code="no_route",
        )
    return tuple(plan)


def _resolve(catalog: Catalog, model_id: str, param: str) -> tuple[Model, tuple[Route, ...]]:
    model = catalog.models.get(model_id)
    if model is not None:
        return model, model.routes
    provider_name, _, rest = model_id.partition("/")
    if rest and provider_name in catalog.providers:
        model = catalog.models.get(rest)
        if model is not None:
            pinned = tuple(r for r in model.routes if r.provider.name == provider_name)
            if pinned:
                return model, pinned
            raise NotFound(
                f"model '{rest}' is not served by provider '{provider_name}'",
                param=param,
                code="model_not_found",
            )
    raise NotFound(
        f"the model '{model_id}' does not exist or is not served here; GET /v1/models lists them",
        param=param,
        code="model_not_found",
    )


def _apply_preferences(
    routes: tuple[Route, ...], preferences: ProviderPreferences | None
) -> tuple[Route, ...]:
    if preferences is None:
        return routes
    kept = list(routes)
    if preferences.only is not None:
        only = set(preferences.only)
        kept = [r for r in kept if r.provider.name in only]
    if preferences.ignore:
        ignore = set(preferences.ignore)
        kept = [r for r in kept if r.provider.name not in ignore]
    if preferences.order:
        rank = {name: index for index, name in enumerate(preferences.order)}
        # sorted() is stable: providers not in `order` keep the catalog's order after them.
        kept.sort(key=lambda r: rank.get(r.provider.name, len(rank)))
        if not preferences.allow_fallbacks:
            kept = [r for r in kept if r.provider.name in rank]
    elif not preferences.allow_fallbacks:
        kept = kept[:1]
    return tuple(kept)


def _check_output_limit(model: Model, request: ChatRequest) -> None:
    limit = request.max_output_tokens
    if limit is not None and limit > model.max_output_tokens:
        param = (
            "max_completion_tokens"
            if request.forward_body.get("max_completion_tokens") is not None
            else "max_tokens"
        )
        raise InvalidRequest(
            f"{param} is {limit}, but model '{model.id}' produces at most "
            f"{model.max_output_tokens} tokens",
            param=param,
            code="invalid_value",
        )
