"""The auth plugin's errors, in the OpenAI envelope every route answers with.

LiteLLM's exception handler for ``ProxyException`` answers
``{"error": {"message", "type", "param", "code"}}`` with the status from ``ProxyException.code``
(``litellm/proxy/proxy_server.py``, ``openai_exception_handler``); ``code`` in the body is that
status as a string unless ``to_dict`` says otherwise. ``EnvelopeError`` lets the body carry a
machine-readable reason instead (``model_not_found``, as the admission plugin and OpenAI do);
``SubstituteError`` is also an ``HTTPException``, the only type a
``CustomLogger.async_post_call_failure_hook`` may substitute for the original error
(``ProxyLogging.post_call_failure_hook`` in ``litellm/proxy/utils.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, status
from litellm.proxy._types import ProxyException

MODEL_NOT_FOUND = "model_not_found"


class EnvelopeError(ProxyException):
    """Raised from ``custom_auth``: LiteLLM's auth error handler passes a ``ProxyException``
    through as it is (``_as_proxy_exception`` in ``litellm/proxy/auth/auth_exception_handler.py``
    turns an ``HTTPException`` into a 401-typed ``auth_error`` first, so this is not one)."""

    def __init__(
        self,
        message: str,
        type: str,
        param: str | None,
        status_code: int,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            message=message,
            type=type,
            param=param,
            code=status_code,
            headers=headers,
            openai_code=reason,
        )
        self.status_code = status_code
        self.reason = reason

    def to_dict(self) -> dict[str, object]:
        """``code`` is the reason when there is one, else the status (LiteLLM's convention);
        the status itself stays in ``self.code``, which the proxy's handler reads."""
        body: dict[str, object] = dict(super().to_dict())
        if self.reason is not None:
            body["code"] = self.reason
        return body


class SubstituteError(EnvelopeError, HTTPException):
    """Returned by a ``CustomLogger.async_post_call_failure_hook`` in place of the original
    error; LiteLLM's ``_handle_llm_api_exception`` raises a ``ProxyException`` as it is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # EnvelopeError's arguments
        super().__init__(*args, **kwargs)
        self.detail = self.message


def model_not_found(model: str, detail: str = "") -> EnvelopeError:
    """404 for a model the gateway does not serve (the message of the admission plugin's)."""
    return EnvelopeError(
        message=f"model {model!r} does not exist on this gateway{detail}",
        type="invalid_request_error",
        param="model",
        status_code=status.HTTP_404_NOT_FOUND,
        reason=MODEL_NOT_FOUND,
    )
