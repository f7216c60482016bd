"""Classification of Triton errors, and the LiteLLM exception each one becomes.

``classify_upstream_error`` is the policy, a pure function of the HTTP status (``None`` when no
response came back) and the error text. Since Triton 2.42 (server commit 7b7ef51, "Modify HTTP
frontend to return error code reflecting Triton error", #6713) ``/generate`` and
``/generate_stream`` answer with the status of the Triton error code of the first response, as
``/infer`` does (``HttpCodeFromError`` in ``src/http_server.cc``): INTERNAL → 500, NOT_FOUND →
404, UNAVAILABLE → 503, UNSUPPORTED → 501, INVALID_ARG / UNKNOWN / ALREADY_EXISTS / CANCELLED →
400. An error after the first event arrives inside a 200 stream (``data: {"error": ...}``). So

* Triton core's own overflow, "Exceeds maximum queue size" and "Request timeout expired"
  (UNAVAILABLE), is a 503;
* TensorRT-LLM's executor overflow, "Maximum queue size of N has been reached, please try again
  later" (INTERNAL), is a 500, its text followed by " (file:line)" and a backtrace, and prefixed
  "in ensemble 'ensemble', " when it comes through the ensemble;
* but what reaches the HTTP frontend from a Python-backend model (the LLM-API model, our CPU
  stand-in) is another matter: measured on the nvidia-pytriton wheel's tritonserver 2.51, the
  stand-in's executor overflow raised as INTERNAL arrives as **400** on both endpoints, directly
  and through the ensemble.

Messages are therefore matched **before** statuses: every overflow form, whatever its status and
wherever in the text it stands, is an overload. ``to_litellm_exception`` maps a classification
to what LiteLLM understands: everything that means "this replica cannot take the request now" is
``litellm.ServiceUnavailableError`` (503), which the Router counts against that deployment
(cooldown) and retries elsewhere.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import litellm

from plugins.triton_provider.settings import PROVIDER


class ErrorKind(enum.StrEnum):
    TRITON_QUEUE_FULL = "triton_queue_full"
    TRITON_QUEUE_TIMEOUT = "triton_queue_timeout"
    ENGINE_QUEUE_FULL = "engine_queue_full"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_UNAVAILABLE = "model_unavailable"
    CONNECTION = "connection"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    BAD_REQUEST = "bad_request"
    UPSTREAM = "upstream"


@dataclass(frozen=True)
class UpstreamError:
    kind: ErrorKind
    retryable: bool
    status_code: int | None
    message: str

    @property
    def is_overload(self) -> bool:
        """The replica is full: a signal for load-aware routing, not a fault."""
        return self.kind in (
            ErrorKind.TRITON_QUEUE_FULL,
            ErrorKind.TRITON_QUEUE_TIMEOUT,
            ErrorKind.ENGINE_QUEUE_FULL,
        )


# (pattern, kind, retryable), tried in order on the message before the status is looked at
_MESSAGE_RULES: tuple[tuple[re.Pattern[str], ErrorKind, bool], ...] = (
    (re.compile(r"exceeds maximum queue size", re.I), ErrorKind.TRITON_QUEUE_FULL, True),
    (re.compile(r"request timeout expired", re.I), ErrorKind.TRITON_QUEUE_TIMEOUT, True),
    (
        re.compile(r"maximum queue size of \d+ has been reached", re.I),
        ErrorKind.ENGINE_QUEUE_FULL,
        True,
    ),
    (
        re.compile(r"unknown model\b.*\bnot found", re.I),
        ErrorKind.MODEL_NOT_FOUND,
        False,
    ),
    (
        re.compile(
            r"has no available versions|not at ready state|is not ready|"
            r"model is unloading|\bunavailable\b",
            re.I,
        ),
        ErrorKind.MODEL_UNAVAILABLE,
        True,
    ),
)
# No response: a failed connect (nothing reached Triton) is "connection" even when it timed out;
# a read timeout (the request may be running) is "timeout".
_CONNECT_TEXT = re.compile(r"connect", re.I)
_TIMEOUT_TEXT = re.compile(r"timed? ?out|timeout", re.I)


def classify_upstream_error(status_code: int | None, message: str) -> UpstreamError:
    """What a Triton error means for the gateway: its kind and whether another try may work.

    ``status_code`` is ``None`` when no HTTP response came back (refused, reset, timed out).
    """
    for pattern, kind, retryable in _MESSAGE_RULES:
        if pattern.search(message):
            return UpstreamError(kind, retryable, status_code, message)
    if status_code is None:
        timed_out = _TIMEOUT_TEXT.search(message) and not _CONNECT_TEXT.search(message)
        kind = ErrorKind.TIMEOUT if timed_out else ErrorKind.CONNECTION
        return UpstreamError(kind, True, None, message)
    if status_code == 404:
        return UpstreamError(ErrorKind.MODEL_NOT_FOUND, False, status_code, message)
    if status_code == 429:
        return UpstreamError(ErrorKind.RATE_LIMITED, True, status_code, message)
    if status_code in (502, 503, 504):
        return UpstreamError(ErrorKind.MODEL_UNAVAILABLE, True, status_code, message)
    if 400 <= status_code < 500:
        return UpstreamError(ErrorKind.BAD_REQUEST, False, status_code, message)
    return UpstreamError(ErrorKind.UPSTREAM, status_code >= 500, status_code, message)


def describe(error: UpstreamError, api_base: str, model: str) -> str:
    status = "no response" if error.status_code is None else f"HTTP {error.status_code}"
    return f"Triton {api_base} model {model!r}: {error.kind.value} ({status}): {error.message}"


def to_litellm_exception(error: UpstreamError, *, model: str, api_base: str) -> Exception:
    """The LiteLLM exception for ``error``; its message keeps the upstream text and api_base."""
    text = describe(error, api_base, model)
    debug = f"api_base={api_base} kind={error.kind.value} retryable={error.retryable}"
    kind = error.kind
    if error.is_overload or kind in (ErrorKind.MODEL_UNAVAILABLE, ErrorKind.CONNECTION):
        return litellm.ServiceUnavailableError(
            message=text, llm_provider=PROVIDER, model=model, litellm_debug_info=debug
        )
    if kind is ErrorKind.TIMEOUT:
        return litellm.Timeout(
            message=text, model=model, llm_provider=PROVIDER, litellm_debug_info=debug
        )
    if kind is ErrorKind.MODEL_NOT_FOUND:
        return litellm.NotFoundError(
            message=text, model=model, llm_provider=PROVIDER, litellm_debug_info=debug
        )
    if kind is ErrorKind.RATE_LIMITED:
        return litellm.RateLimitError(
            message=text, llm_provider=PROVIDER, model=model, litellm_debug_info=debug
        )
    if kind is ErrorKind.BAD_REQUEST:
        return litellm.BadRequestError(
            message=text, model=model, llm_provider=PROVIDER, litellm_debug_info=debug
        )
    return litellm.InternalServerError(
        message=text, llm_provider=PROVIDER, model=model, litellm_debug_info=debug
    )
