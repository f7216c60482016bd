"""One place that learns when a proxied request has ended, however it ended.

Both plugins hold something per request (a routing reservation, an admission ticket) that must
be given back exactly when the request is over. LiteLLM reports that end through several hooks;
``RequestEndHook`` listens to all of them and calls ``on_request_end`` (which must be idempotent,
since more than one may fire for a request):

* ``async_log_success_event``: once per request; for a stream, at its end;
* ``async_log_failure_event``: once per failed request;
* ``async_post_call_streaming_iterator_hook``: its ``finally`` runs when the client disconnects
  mid-stream (cancellation or ``GeneratorExit``), where no logging event fires. The release runs
  in a task of its own, so that the cancellation cannot cut it short.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import UserAPIKeyAuth


class RequestEndHook(CustomLogger):
    def __init__(self) -> None:
        super().__init__()
        self._tasks: set[asyncio.Task[None]] = set()

    async def on_request_end(self, data: Mapping[str, Any]) -> None:
        """Give back what the request (``data["litellm_call_id"]``) holds; idempotent."""
        raise NotImplementedError

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        await self.on_request_end(kwargs)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        await self.on_request_end(kwargs)

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: UserAPIKeyAuth, response: Any, request_data: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        try:
            async for item in response:
                yield item
        finally:
            task = asyncio.get_running_loop().create_task(self.on_request_end(request_data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
