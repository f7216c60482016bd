"""The 503 the gateway answers with: OpenAI error envelope, ``Retry-After``, ``retry-after-ms``."""

from __future__ import annotations

import json
from enum import StrEnum

from fastapi import HTTPException
from litellm.proxy._types import ProxyException

from plugins.admission.retry_after import retry_after_headers


class ShedReason(StrEnum):
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    EXPECTED_WAIT = "expected_wait"
    NO_HEALTHY_REPLICA = "no_healthy_replica"
    UPSTREAM_OVERLOADED = "upstream_overloaded"
    LOAD_FAILED = "load_failed"
    MODEL_LOADING = "model_loading"
    GATEWAY_BUSY = "gateway_busy"
    FLOW_QUEUE_FULL = "flow_queue_full"
    TTFT_DEADLINE = "ttft_deadline"


MESSAGES = {
    ShedReason.QUEUE_FULL: "model {model!r} is at capacity and its wait queue is full",
    ShedReason.QUEUE_TIMEOUT: "model {model!r} is at capacity: no slot freed within {wait}",
    ShedReason.EXPECTED_WAIT: (
        "model {model!r} is at capacity: the expected wait in its queue is over {wait}"
    ),
    ShedReason.NO_HEALTHY_REPLICA: "model {model!r} has no healthy replica right now",
    ShedReason.UPSTREAM_OVERLOADED: "every replica of model {model!r} is full",
    ShedReason.LOAD_FAILED: "model {model!r} could not be loaded",
    ShedReason.MODEL_LOADING: "model {model!r} is still loading after {wait}",
    ShedReason.FLOW_QUEUE_FULL: (
        "model {model!r} is at capacity and this key's (or tenant's) requests hold all the "
        "places in its wait queue they may"
    ),
    ShedReason.TTFT_DEADLINE: (
        "model {model!r} is at capacity: this request would wait in its queue past its "
        "time-to-first-token deadline ({wait})"
    ),
    ShedReason.GATEWAY_BUSY: (
        "the gateway is too busy to admit a {model!r} request right now (no free connection "
        "to its load store)"
    ),
}


class GatewayError(ProxyException, HTTPException):
    """A ``ProxyException`` (the proxy sends its envelope and headers as they are) that is also
    an ``HTTPException``, the only type ``async_post_call_failure_hook`` may substitute."""

    def __init__(
        self,
        message: str,
        type: str,
        param: str | None,
        status: int,
        code: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        ProxyException.__init__(
            self,
            message=message,
            type=type,
            param=param,
            code=status,
            headers=headers,
            openai_code=code,
        )
        self.status_code = status
        self.detail = message

    def to_dict(self) -> dict[str, object]:
        """The envelope's ``code`` is the machine-readable reason (``queue_full``, ...); the
        HTTP status stays in ``self.code``, which the proxy's exception handler reads."""
        return {**super().to_dict(), "code": self.openai_code}


def stream_start_event(error: GatewayError) -> str:
    """``error`` as the SSE event a stream starts with, which the proxy answers as a plain JSON
    error with the event's status (LiteLLM reads the status from the envelope's ``code``, so in
    this one case ``code`` is the status and the reason moves to ``reason``)."""
    envelope = {**error.to_dict(), "code": str(error.status_code), "reason": error.openai_code}
    return f"data: {json.dumps({'error': envelope})}\n\n"


def overloaded(
    model: str,
    reason: ShedReason,
    retry_after_s: float,
    wait: str = "",
    detail: str = "",
    status: int = 503,
) -> GatewayError:
    """503 with the envelope ``{"error": {"message", "type", "param", "code"}}`` and headers
    (``status`` 429: a limit of the key's own, ``rate_limit_error``)."""
    message = MESSAGES[reason].format(model=model, wait=wait)
    if detail:
        message = f"{message}: {detail}"
    return GatewayError(
        message=f"{message}; retry after {retry_after_s:.1f} s",
        type="rate_limit_error" if status == 429 else "service_unavailable",
        param=None,
        status=status,
        code=reason.value,
        headers=retry_after_headers(retry_after_s),
    )


def model_unplaceable(model: str, reason: str) -> GatewayError:
    """404: the model is catalogued but no server could ever host it."""
    return GatewayError(
        message=f"model {model!r} cannot be served by this gateway: {reason}",
        type="invalid_request_error",
        param="model",
        status=404,
        code="model_unplaceable",
    )


def model_not_found(model: str | None) -> GatewayError:
    return GatewayError(
        message=f"model {model!r} does not exist on this gateway",
        type="invalid_request_error",
        param="model",
        status=404,
        code="model_not_found",
    )
