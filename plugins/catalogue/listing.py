"""``GET /v1/models`` (and ``/models``) with each model's state, in the OpenAI list shape.

LiteLLM lists its configured model groups; a catalogue also offers models that are loaded
nowhere yet. This listing is the union of the catalogued models that some server could host
(or whose servers have not reported their topology yet) and the proxy's other model groups
(statically deployed: ``loaded``), each with ``state``: ``loaded`` (serving somewhere),
``loading`` (a cold load is running) or ``available`` (loaded on first request). A key limited
to some models sees only those. The route is put ahead of LiteLLM's own ``/v1/models`` on the
proxy's app, behind LiteLLM's key check.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from litellm.proxy._types import UserAPIKeyAuth

from plugins.auth.model_access import enforced_for, model_allowed
from plugins.catalogue.placement import infeasibility
from plugins.catalogue.settings import Catalogue
from plugins.catalogue.view import ModelView

ModelState = Literal["loaded", "loading", "available"]


def catalogued_state(catalogue: Catalogue, view: ModelView) -> ModelState | None:
    """The listed state of a catalogued model; None: no server could ever host it."""
    if view.serving:
        return "loaded"
    if view.loading_on is not None:
        return "loading"
    entry = catalogue.models[view.model]
    for server in view.servers:
        if server.topology is None or infeasibility(entry, server.topology) is None:
            return "available"
    return None


def model_entry(name: str, state: ModelState, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "triage", "state": state}


def visible(name: str, user: UserAPIKeyAuth) -> bool:
    return not enforced_for(user) or model_allowed(name, list(user.models))


Lister = Callable[[UserAPIKeyAuth], Awaitable[dict[str, Any]]]


def install_models_route(app: FastAPI, lister: Lister) -> None:
    """Serve ``lister`` at ``/v1/models`` and ``/models``, ahead of LiteLLM's routes."""
    from litellm.proxy.auth.user_api_key_auth import user_api_key_auth

    async def list_models(
        user_api_key_dict: UserAPIKeyAuth = Depends(user_api_key_auth),  # noqa: B008
    ) -> dict[str, Any]:
        return await lister(user_api_key_dict)

    for path in ("/v1/models", "/models"):
        route = APIRoute(path, list_models, methods=["GET"], tags=["model management"])
        app.router.routes.insert(0, route)


def now_s() -> int:
    return int(time.time())
