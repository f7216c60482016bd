"""Restart a stream that overflowed before its first chunk on another replica.

LiteLLM returns a stream to the proxy before the provider has read a byte, so a replica that
refuses a streaming request (queue full, executor full, 429/503) fails on the proxy's first
read, after the router's retry loop is over; LiteLLM's router only sends such first-chunk
errors to ``fallbacks`` (other model groups), never to ``num_retries``. Nothing has reached the
client at that point, so the routing hook restarts the request itself:

1. the failed attempt's reservation is released and its replica marked failed;
2. the request is sent again through the proxy's router, under a new call id
   (``<call id>.restart<n>``) that joins the request's ticket (``TicketBook.alias``), so its
   pick avoids every replica this request failed on;
3. at most ``router.num_retries`` restarts, and none once every replica of the model failed:
   then the last error goes on to the admission plugin, which answers 503 + Retry-After.

Errors that are not overflow (a bad request, a broken replica) are not restarted. The proxy
builds a stream's response headers from the first response's hidden params, so a restart that
starts streaming copies its own (``x-litellm-model-id``: the replica that served) into them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from litellm import Router
from litellm.router_utils.add_retry_fallback_headers import get_hidden_params_dict
from prometheus_client import Counter

from plugins import tracing
from plugins.overflow import is_upstream_overflow
from plugins.routing.strategy import LeastBusyStrategy

log = logging.getLogger(__name__)

STREAM_RESTARTS = Counter(
    "triage_routing_stream_restarts",
    "Streams restarted on another replica after an overflow before their first chunk",
    ["model"],
)

RESTARTS_KEY = "_triage_stream_restarts"
"""In the proxy's request data: the call ids of this request's restarted attempts."""

POST_CALL_KEYS = frozenset(
    {"litellm_logging_obj", "litellm_call_id", "deployment", "_litellm_client_requested_model"}
)
"""Request-data keys the proxy adds for (or after) the first call; a restart gets its own."""


def restart_kwargs(request_data: Mapping[str, Any], call_id: str) -> dict[str, Any]:
    """The router call of a restart: the request as the proxy sent it, under ``call_id``."""
    kwargs = {
        k: v
        for k, v in request_data.items()
        if k not in POST_CALL_KEYS and not k.startswith("_triage")
    }
    for name in ("metadata", "litellm_metadata"):
        if isinstance(kwargs.get(name), dict):
            kwargs[name] = dict(kwargs[name])  # the router writes the attempt's deployment in it
    kwargs["litellm_call_id"] = call_id
    return kwargs


def replica_of_stream(stream: object) -> str | None:
    model_id = get_hidden_params_dict(stream).get("model_id")
    return str(model_id) if model_id else None


def adopt_headers(first_response: object, restarted: object) -> None:
    """Describe the restarted stream in the headers the proxy builds from the first one."""
    hidden = get_hidden_params_dict(first_response)
    for key, value in get_hidden_params_dict(restarted).items():
        if key != "additional_headers":  # the admission plugin holds that dict
            hidden[key] = value


def restart_ids(request_data: Mapping[str, Any]) -> list[str]:
    ids = request_data.get(RESTARTS_KEY)
    return list(ids) if isinstance(ids, list) else []


async def relay_with_restarts(
    strategy: LeastBusyStrategy,
    router: Router | None,
    response: AsyncIterator[Any],
    request_data: dict[str, Any],
) -> AsyncIterator[Any]:
    """The upstream's chunks; an overflow before the first one restarts the request."""
    stream: Any = response
    call_id = str(request_data.get("litellm_call_id") or "")
    while True:
        iterator = stream.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except Exception as exc:
            restarted = await _restart(strategy, router, stream, exc, request_data, call_id)
            if restarted is None:
                raise
            stream = restarted
            continue
        if stream is not response:
            adopt_headers(response, stream)
        yield first
        async for item in iterator:
            yield item
        return


async def _restart(
    strategy: LeastBusyStrategy,
    router: Router | None,
    failed_stream: object,
    exc: Exception,
    request_data: dict[str, Any],
    call_id: str,
) -> AsyncIterator[Any] | None:
    if router is None or not call_id or not is_upstream_overflow(exc):
        return None
    previous = restart_ids(request_data)
    replica = replica_of_stream(failed_stream)
    await strategy.release_attempt(call_id, replica, failed=True)
    avoid = strategy.failed_replicas(call_id)
    if replica is not None:
        avoid.add(replica)
    model = str(request_data.get("model") or "")
    replicas = set(router.get_model_ids(model_name=model))
    if len(previous) >= router.num_retries or not replicas - avoid:
        log.info(
            "routing: stream for %s overflowed on %s; no restart left (%d done, failed on %s)",
            model,
            replica,
            len(previous),
            sorted(avoid),
        )
        return None
    new_id = f"{call_id}.restart{len(previous) + 1}"
    STREAM_RESTARTS.labels(model).inc()
    strategy.book.alias(new_id, call_id).failed.update(avoid)
    request_data[RESTARTS_KEY] = [*previous, new_id]
    log.info(
        "routing: stream for %s overflowed on %s before its first chunk (%s); restart %s avoids %s",
        model,
        replica,
        exc,
        new_id,
        sorted(avoid),
    )
    with tracing.span(
        "triage.stream_restart",
        tracing.parent_span(request_data),
        model=model,
        failed_replica=replica,
        restart=len(previous) + 1,
    ):
        return await router.acompletion(**restart_kwargs(request_data, new_id))
