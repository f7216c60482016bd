"""LiteLLM proxy hook of the model catalogue: cold-load before admission, and the listing.

* ``async_pre_call_hook`` (after the key's model check, before the admission gate): a request
  for a catalogued model that is loaded nowhere waits for ``ColdLoader.ensure_loaded`` (one load
  per model across every proxy), or gets its 404 / 503.
* ``/v1/models``: the catalogue's models with their state (``listing.py``).

Redis unreachable: requests pass unchecked (fail open, logged), as routing and admission do.
"""

from __future__ import annotations

import logging
from typing import Any

from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import UserAPIKeyAuth
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.redis_client import fail_fast_redis
from plugins.admission.hook import GATED_CALLS
from plugins.catalogue.listing import (
    catalogued_state,
    install_models_route,
    model_entry,
    now_s,
    visible,
)
from plugins.catalogue.loader import ColdLoader
from plugins.catalogue.settings import Catalogue, CatalogueSettings
from plugins.routing.hook import proxy_router

log = logging.getLogger(__name__)


class CatalogueHook(CustomLogger):
    def __init__(self, settings: CatalogueSettings) -> None:
        super().__init__()
        self.settings = settings
        self.catalogue: Catalogue = settings.catalogue()  # a bad file fails the proxy's start
        self._loader: ColdLoader | None = None

    @property
    def loader(self) -> ColdLoader:
        if self._loader is None:  # created on first use, inside the proxy's event loop
            client: Redis = fail_fast_redis(
                str(self.settings.redis_url), self.settings.redis_timeout_ms
            )
            self._loader = ColdLoader(self.settings, self.catalogue, client)
        return self._loader

    async def async_pre_call_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        cache: Any,
        data: dict[str, Any],
        call_type: Any,
    ) -> None:
        model = data.get("model")
        gated = str(call_type) in GATED_CALLS
        if gated and isinstance(model, str) and model in self.catalogue.models:
            try:
                await self.loader.ensure_loaded(model)
            except RedisError as exc:
                # fail open: without Redis no load can be coordinated, but a model that is
                # loaded somewhere is still served (routing and admission have fallbacks)
                log.warning("catalogue: Redis unavailable, %s passes unchecked: %s", model, exc)
        return None

    async def list_models(self, user: UserAPIKeyAuth) -> dict[str, Any]:
        created = now_s()
        data: list[dict[str, Any]] = []
        for name in self.catalogue.models:
            if not visible(name, user):
                continue
            state = catalogued_state(self.catalogue, await self.loader.view.read(name))
            if state is not None:
                data.append(model_entry(name, state, created))
        router = proxy_router()
        others = router.get_model_names() if router is not None else []
        for name in sorted(set(others) - set(self.catalogue.models)):
            if visible(name, user):
                data.append(model_entry(name, "loaded", created))
        return {"object": "list", "data": data}

    def install_listing(self) -> None:
        """Put the stateful ``/v1/models`` on the proxy's app (inside the proxy only)."""
        from litellm.proxy import proxy_server

        install_models_route(proxy_server.app, self.list_models)
        log.info("catalogue: %d models; /v1/models lists their state", len(self.catalogue.models))
