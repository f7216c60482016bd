"""What counts as an upstream overflow: one classification for both plugins.

A replica that cannot take a request right now (its queue is full, the executor refused it, it
answered 429 or 503) is *overflow*: retryable on another replica, or later. The Triton provider
maps the three Triton / TensorRT-LLM overflow answers to ``ServiceUnavailableError``; a stream
that fails before its first chunk reaches the proxy wrapped in LiteLLM's
``MidStreamFallbackError`` (itself a ``ServiceUnavailableError``, whatever the cause), so the
cause is unwrapped first.
"""

from __future__ import annotations

import litellm
from litellm.exceptions import MidStreamFallbackError
from litellm.proxy._types import ProxyException
from starlette.exceptions import HTTPException

OVERFLOW_STATUSES = frozenset({429, 503})


def cause_of(exc: BaseException) -> BaseException:
    """The provider's own error behind LiteLLM's stream wrappers."""
    seen = 0
    while isinstance(exc, MidStreamFallbackError) and exc.original_exception is not None:
        exc = exc.original_exception
        seen += 1
        if seen > 8:  # a cycle would be a LiteLLM bug; stop rather than loop
            break
    return exc


def is_upstream_overflow(exc: BaseException) -> bool:
    """A replica (or all of them) could not take the request: retryable elsewhere or later."""
    exc = cause_of(exc)
    if isinstance(exc, ProxyException | HTTPException):
        # the gateway's own answers pass through untouched: sheds, 404s, and LiteLLM's rate
        # limiter's 429 for a key over its rpm/tpm (``ProxyRateLimitError`` is an HTTPException
        # and a RateLimitError: the key is over its limit, not a replica)
        return False
    if isinstance(exc, litellm.ServiceUnavailableError | litellm.RateLimitError):
        return True
    return getattr(exc, "status_code", None) in OVERFLOW_STATUSES
