"""LiteLLM callback that keeps the strategy installed and releases reservations.

Registered in the proxy config (``litellm_settings.callbacks``). Why each hook:

* ``async_pre_call_hook`` (every proxy request, before routing): re-installs the strategy when
  the proxy's router was rebuilt or re-initialised (``routing_strategy_init`` drops custom
  strategies), so the override survives config reloads.
* ``async_post_call_failure_deployment_hook`` (every failed attempt, retries included): give
  back that attempt's reservation and mark its replica failed in the request's ticket.
* ``async_post_call_success_deployment_hook``: a request that is not a stream succeeded: it is
  over, its ticket is released (``plugins/request_ticket.py``: with the admission plugin, the
  admission and the gate's reservation go back in one Redis call). A stream's attempt
  "succeeds" when it starts, so streams are released at their end instead:
* ``async_log_success_event`` (once per request, a stream's at its end),
  ``async_post_call_failure_hook`` (the proxy answers the request with an error) and
  ``async_post_call_streaming_iterator_hook`` (its ``finally`` runs when the client disconnects
  mid-stream): the request's end (``RequestEndHook``, shared with the admission plugin).
* ``async_log_failure_event`` is *not* a request's end here: LiteLLM logs it for every failed
  attempt, in a task of its own, while the router may still retry. Ending the request there
  forgot which replicas it had failed on, so a retry that picked after it could go back to the
  replica that had just refused it (measured with a SIGKILLed replica: 5 of 7 retries did). It
  only marks that attempt's replica failed (the deployment failure hook has already released
  the attempt's reservation).
* ``relay`` (inside the streaming iterator hook): a stream that overflows before its first chunk
  is restarted on another replica (``stream_restart.py``); LiteLLM's router would not retry it.

The ticket is released once whatever the order of these (``TicketBook.end``); a reservation
that is never given back expires with its lease.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from litellm import Router
from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper
from litellm.proxy._types import UserAPIKeyAuth

from plugins.request_end import RequestEndHook
from plugins.routing.settings import RoutingSettings
from plugins.routing.strategy import LeastBusyStrategy
from plugins.routing.stream_restart import relay_with_restarts

log = logging.getLogger(__name__)


def call_id_of(data: Mapping[str, Any]) -> str | None:
    value = data.get("litellm_call_id")
    return str(value) if value else None


def replica_of(data: Mapping[str, Any]) -> str | None:
    """The chosen deployment's ``model_info.id`` in an attempt's kwargs (or in a logging
    event's, which keeps them under ``litellm_params``)."""
    for name in ("metadata", "litellm_metadata"):
        metadata = data.get(name)
        if isinstance(metadata, Mapping):
            info = metadata.get("model_info")
            if isinstance(info, Mapping) and info.get("id"):
                return str(info["id"])
    info = data.get("model_info")
    if isinstance(info, Mapping) and info.get("id"):
        return str(info["id"])
    params = data.get("litellm_params")
    if isinstance(params, Mapping) and params is not data:
        return replica_of(params)
    return None


def proxy_router() -> Router | None:
    """The LiteLLM proxy's current router (None outside the proxy)."""
    from litellm.proxy import proxy_server

    router = getattr(proxy_server, "llm_router", None)
    return router if isinstance(router, Router) else None


class RoutingHook(RequestEndHook):
    # LiteLLM's proxy runs this hook only when the registered class defines it in its own
    # ``__dict__`` (a leaf-class check); inheriting it from ``RequestEndHook`` is not enough
    async_post_call_streaming_iterator_hook = RequestEndHook.async_post_call_streaming_iterator_hook

    def __init__(self, settings: RoutingSettings) -> None:
        super().__init__()
        self.strategy = LeastBusyStrategy(settings)

    def ensure_installed(self, router: Router | None) -> None:
        if router is not None and not self.strategy.installed_on(router):
            self.strategy.install(router)

    async def async_pre_call_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        cache: Any,
        data: dict[str, Any],
        call_type: Any,
    ) -> None:
        self.ensure_installed(proxy_router())
        return None

    async def async_post_call_success_deployment_hook(
        self, request_data: dict[str, Any], response: Any, call_type: Any
    ) -> None:
        if request_data.get("stream") or isinstance(response, CustomStreamWrapper):
            return None  # released when the stream ends
        call_id = call_id_of(request_data)
        if call_id is not None:
            # LiteLLM awaits this hook before it answers: the ticket is released in a task of
            # its own, within the same loop turn, not on the response's path
            self.spawn(self.strategy.book.end(call_id))
        return None

    async def async_post_call_failure_deployment_hook(
        self,
        request_data: Mapping[str, Any],
        exception: Exception,
        call_type: Any,
        fallback_depth: int | None = None,
    ) -> None:
        call_id = call_id_of(request_data)
        if call_id is not None:
            await self.strategy.release_attempt(call_id, replica_of(request_data), failed=True)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """One attempt failed (LiteLLM logs every attempt's failure, the router may retry):
        the request goes on, so its failed replicas are kept for its retries' picks (the
        deployment failure hook has recorded this one and released its reservation already;
        a late event of a request that has ended records nothing)."""
        call_id = call_id_of(kwargs)
        replica_id = replica_of(kwargs)
        if call_id is not None and replica_id is not None and kwargs.get("stream") is not True:
            self.strategy.note_failed(call_id, replica_id)

    def relay(
        self, response: AsyncIterator[Any], request_data: dict[str, Any]
    ) -> AsyncIterator[Any]:
        return relay_with_restarts(self.strategy, proxy_router(), response, request_data)

    async def on_request_end(self, data: Mapping[str, Any]) -> None:
        call_id = call_id_of(data)
        if call_id is not None:
            await self.strategy.book.end(call_id)  # a stream's restarts share its ticket
