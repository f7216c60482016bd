"""LiteLLM proxy hook: the admission gate before routing, releases after, overflow → 503.

* ``async_pre_call_hook``: admit, wait in the fleet-wide queue, or raise the 503 (envelope,
  ``Retry-After``, ``retry-after-ms``); an unknown model is a 404 with the envelope.
* ``async_post_call_success_deployment_hook`` (a request that is not a stream succeeded): the
  request's ticket is released at once (``plugins/request_ticket.py``): the admission slot and
  the routing reservation the gate took for it, in one Redis call (the freed batch slot goes to
  a waiter in that same call);
* ``async_log_success_event`` / ``async_post_call_failure_hook`` / the streaming iterator's
  ``finally`` (client disconnect): the request's end (``RequestEndHook``): its ticket, once.
* ``async_post_call_failure_hook``: an upstream overflow that survived the router's retries on
  other replicas (every replica full) reaches the client as 503 + ``Retry-After`` + envelope,
  not as LiteLLM's 500 / 429 with only ``llm_provider-retry-after``.
* ``relay`` + ``async_post_call_response_headers_hook``: the same for a stream whose every
  restart overflowed before its first chunk. The proxy sends no headers of an exception raised
  while it reads a stream's first chunk, so the relay starts the stream with the 503 as an
  error event (which the proxy answers as a JSON error with the event's status) and puts
  ``Retry-After`` in the stream's ``additional_headers``, which the proxy reads after that chunk.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import HTTPException
from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper
from litellm.proxy._types import UserAPIKeyAuth

from core.redis_client import fail_fast_redis
from plugins.admission.controller import AdmissionController
from plugins.admission.errors import (
    GatewayError,
    ShedReason,
    model_not_found,
    stream_start_event,
)
from plugins.admission.gate import AdmissionGate
from plugins.admission.rules import FlowCall
from plugins.admission.settings import DEADLINE_HEADER, AdmissionSettings
from plugins.auth.identity import flow_of, priority_of
from plugins.loop_lag import MONITOR
from plugins.overflow import is_upstream_overflow
from plugins.request_end import RequestEndHook
from plugins.request_ticket import TICKETS, TicketBook
from plugins.routing.hook import proxy_router
from plugins.routing.policy import NO_SHAPE, RequestShape
from plugins.routing.prefix import shape_of_request
from plugins.tracing import annotate, span

log = logging.getLogger(__name__)

GATED_CALLS = {"completion", "acompletion", "text_completion", "atext_completion", "responses"}
STREAM_HEADERS_KEY = "_triage_stream_headers"
"""In the proxy's request data: the stream's ``additional_headers`` (sent as response headers)."""


class AdmissionHook(RequestEndHook):
    # LiteLLM's proxy runs this hook only when the registered class defines it in its own
    # ``__dict__`` (a leaf-class check); inheriting it from ``RequestEndHook`` is not enough
    async_post_call_streaming_iterator_hook = RequestEndHook.async_post_call_streaming_iterator_hook

    def __init__(self, settings: AdmissionSettings, book: TicketBook = TICKETS) -> None:
        super().__init__()
        self.settings = settings
        self.book = book
        self._controller: AdmissionController | None = None

    @property
    def controller(self) -> AdmissionController:
        if self._controller is None:  # created on first use, inside the proxy's event loop
            client = fail_fast_redis(str(self.settings.redis_url), self.settings.redis_timeout_ms)
            self._controller = AdmissionController(
                AdmissionGate(client, self.settings), self.settings, self.book
            )
            MONITOR.ensure_started()  # the event loop's own lag, beside the decision times
        return self._controller

    @property
    def started_controller(self) -> AdmissionController | None:
        """The controller once a request has made it (None before: nothing to remember yet)."""
        return self._controller

    async def async_pre_call_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        cache: Any,
        data: dict[str, Any],
        call_type: Any,
    ) -> None:
        if str(call_type) not in GATED_CALLS:
            return None
        model = data.get("model")
        router = proxy_router()
        replica_ids = router.get_model_ids(model_name=model) if router and model else []
        if not replica_ids:
            raise model_not_found(model)
        ticket = data.get("litellm_call_id")
        if not ticket:
            ticket = data["litellm_call_id"] = str(uuid.uuid4())
        picker = self.book.picker  # the triage routing plugin: pick in the same call
        if picker is not None:
            picker.describe(str(ticket), data)  # the request's size and prompt blocks
        priority = priority_of(user_api_key_dict)
        flow = flow_of(user_api_key_dict)
        cost = 1.0  # without fair share the gate orders by arrival: the prompt is not counted
        if self.settings.fair_share:
            shape = picker.shape(str(ticket)) if picker is not None else NO_SHAPE
            cost = request_cost(data, shape, self.settings.fair_default_output_tokens)
        deadline_ms = request_deadline_ms(data, self.settings.ttft_deadline_ms.get(priority))
        parent = user_api_key_dict.parent_otel_span
        with span("triage.admit", parent, model=str(model), priority=priority):
            await self.controller.admit(
                str(model),
                list(replica_ids),
                str(ticket),
                priority,
                picker if picker is not None and picker.installed_on(router) else None,
                FlowCall(flow.name, flow.weight, cost),
                flow.max_queued,
                None if deadline_ms is None else deadline_ms / 1000.0,
            )
            routing = self.book.get(str(ticket))
            annotate(replica=routing.routing.prepicked if routing and routing.routing else None)
        return None

    async def async_post_call_success_deployment_hook(
        self, request_data: dict[str, Any], response: Any, call_type: Any
    ) -> None:
        if request_data.get("stream") or isinstance(response, CustomStreamWrapper):
            return None  # a stream ends after its last chunk
        ticket = request_data.get("litellm_call_id")
        if ticket:
            self._note_usage(str(ticket), response)
            # LiteLLM awaits this hook before it answers: the release runs in a task of its own
            self.spawn(self.book.end(str(ticket)))
        return None

    def _note_usage(self, call_id: str, response: Any) -> None:
        """The tokens ``response`` reports (``usage.total_tokens``), on the request's ticket:
        its flow's fair share is corrected by them when the ticket is released."""
        usage = getattr(response, "usage", None)
        if usage is None and isinstance(response, Mapping):
            usage = response.get("usage")
        total = usage.get("total_tokens") if isinstance(usage, Mapping) else None
        if total is None:
            total = getattr(usage, "total_tokens", None)
        ticket = self.book.get(call_id)
        if ticket is not None and isinstance(total, int) and total >= 0:
            ticket.usage_tokens = total

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: UserAPIKeyAuth,
        traceback_str: str | None = None,
    ) -> HTTPException | None:
        await self.on_request_end(request_data)
        if not is_upstream_overflow(original_exception):
            return None
        model = str(request_data.get("model") or "")
        shed = self.controller.shed(model, ShedReason.UPSTREAM_OVERLOADED, 1.0)
        log.info(
            "admission: upstream overflow on every replica of %s: %s", model, original_exception
        )
        raise shed

    async def async_post_call_response_headers_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: UserAPIKeyAuth,
        response: object,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, object] | None = None,
    ) -> dict[str, str] | None:
        if data.get("stream") is not True:
            return None
        hidden = getattr(response, "_hidden_params", None)
        if isinstance(hidden, dict):
            extra = hidden.get("additional_headers")
            if not isinstance(extra, dict):
                extra = hidden["additional_headers"] = {}
            data[STREAM_HEADERS_KEY] = extra
        return None

    async def relay(
        self, response: AsyncIterator[Any], request_data: dict[str, Any]
    ) -> AsyncIterator[Any]:
        started = False
        call_id = str(request_data.get("litellm_call_id") or "")
        try:
            async for item in response:
                started = True
                if call_id and getattr(item, "usage", None) is not None:
                    self._note_usage(call_id, item)  # the last chunk (stream_options)
                yield item
        except Exception as exc:
            if started or not is_upstream_overflow(exc):
                raise
            model = str(request_data.get("model") or "")
            shed = self.controller.shed(model, ShedReason.UPSTREAM_OVERLOADED, 1.0)
            log.info("admission: stream for %s overflowed on every replica: %s", model, exc)
            extra = request_data.get(STREAM_HEADERS_KEY)
            if isinstance(extra, dict):
                extra.update(shed.headers or {})
            yield stream_start_event(shed)

    async def on_request_end(self, data: Mapping[str, Any]) -> None:
        ticket = data.get("litellm_call_id")
        if ticket:
            await self.book.end(str(ticket))


def request_deadline_ms(data: Mapping[str, Any], tier_ms: int | None) -> float | None:
    """The request's time-to-first-token deadline: its ``x-triage-ttft-deadline-ms`` header,
    else its tier's; a header that is not a number > 0 is a 400 naming it."""
    server_request = data.get("proxy_server_request")
    headers = server_request.get("headers") if isinstance(server_request, Mapping) else None
    raw = None
    if isinstance(headers, Mapping):
        raw = next((v for k, v in headers.items() if str(k).lower() == DEADLINE_HEADER), None)
    if raw is None:
        return None if tier_ms is None else float(tier_ms)
    try:
        value = float(str(raw).strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise GatewayError(
            message=f"{DEADLINE_HEADER} must be a number of milliseconds > 0, got {raw!r}",
            type="invalid_request_error",
            param=DEADLINE_HEADER,
            status=400,
            code="invalid_header",
        )
    return value


def request_cost(data: Mapping[str, Any], shape: RequestShape, default_output: int) -> float:
    """A request's work for the fair share between flows, in tokens: its prompt and the output
    it may produce (``max_tokens``; ``default_output`` without one). The routing plugin's
    shape of it when there is one (counted once), else the same reading without its prefix
    blocks (``prefix.shape_of_request`` with no salt)."""
    if shape is NO_SHAPE:
        shape = shape_of_request(data, None, 1, 0, default_output)
    return float(max(1, shape.prompt_tokens + shape.output_tokens))
