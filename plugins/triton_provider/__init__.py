"""``triage_triton``: a LiteLLM custom provider for Triton's generate endpoints (see README.md).

The deployment builders and settings import without LiteLLM; the handler and error mapping
(which import LiteLLM, a multi-second import) load on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from plugins.triton_provider.deployments import openai_frontend_deployment, triton_deployment
from plugins.triton_provider.settings import PROVIDER, TritonProviderSettings

_LAZY = {
    "ErrorKind": "errors",
    "UpstreamError": "errors",
    "classify_upstream_error": "errors",
    "to_litellm_exception": "errors",
    "TritonGenerateHandler": "handler",
    "register": "handler",
    "triton_generate": "handler",
}

__all__ = [
    "PROVIDER",
    "ErrorKind",
    "TritonGenerateHandler",
    "TritonProviderSettings",
    "UpstreamError",
    "classify_upstream_error",
    "openai_frontend_deployment",
    "register",
    "to_litellm_exception",
    "triton_deployment",
    "triton_generate",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
