"""One place that learns when a proxied request has ended, however it ended.

Both plugins hold something per request (a routing reservation, an admission ticket) that must
be given back exactly when the request is over. LiteLLM reports that end through several hooks;
``RequestEndHook`` listens to all of them and calls ``on_request_end`` (which must be idempotent,
since more than one may fire for a request):

* ``async_log_success_event``: once per request; for a stream, at its end;
* ``async_post_call_failure_hook``: a request (stream or not) the proxy answers with an error
  (its final failure, after the router's retries);
* ``async_post_call_streaming_iterator_hook``: its ``finally`` ends every stream the proxy
  relays, however it ends (last chunk, error, client disconnect, where no logging event fires).
  The release runs in a task of its own, so that a cancellation cannot cut it short. A stream's
  failure event is not its end: the routing plugin may restart a stream that failed before its
  first chunk on another replica, and the failed attempt's event (fired in a task of its own)
  would otherwise free the request's admission slot while the restarted stream runs.

``async_log_failure_event`` is *not* an end: LiteLLM logs it for every failed attempt, in a task
of its own, while the router may still retry on another replica. Ending the request there freed
its admission ticket while it still ran (the gate over-admitted by one per retrying request) and
made the routing plugin forget which replicas it had failed on. A request that fails for good is
answered with an error, so ``async_post_call_failure_hook`` ends it; a client that goes away is
ended by the front door (``plugins/front_door``).

LiteLLM's proxy runs ``async_post_call_streaming_iterator_hook`` only for a callback whose own
class defines it (``cls.__dict__``), so every registered subclass names it in its class body.

Subclasses change what happens between the proxy and the upstream stream by overriding
``relay`` (the routing plugin restarts a stream that failed before its first chunk; the
admission plugin turns a final overflow into the gateway's 503).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping
from typing import Any

from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import UserAPIKeyAuth

from plugins.background import Background


class RequestEndHook(CustomLogger):
    def __init__(self) -> None:
        super().__init__()
        self.background = Background()

    async def on_request_end(self, data: Mapping[str, Any]) -> None:
        """Give back what the request (``data["litellm_call_id"]``) holds; idempotent."""
        raise NotImplementedError

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        await self.on_request_end(kwargs)

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: UserAPIKeyAuth,
        traceback_str: str | None = None,
    ) -> Any:
        await self.on_request_end(request_data)  # a stream that failed before the proxy relayed it
        return None

    def relay(
        self, response: AsyncIterator[Any], request_data: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """The chunks the proxy sends on; by default the upstream's, unchanged."""
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: UserAPIKeyAuth, response: Any, request_data: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        try:
            async for item in self.relay(response, request_data):
                yield item
        finally:
            self.spawn(self.on_request_end(request_data))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` off the response's path, beyond a cancellation of the request."""
        self.background.spawn(work)
