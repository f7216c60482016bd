"""Pure builders of LiteLLM ``model_list`` entries for Triton replicas.

* ``triton_deployment``: our ``triage_triton`` provider on Triton's generate endpoints.
* ``openai_frontend_deployment``: LiteLLM's stock ``openai/`` provider on Triton's
  OpenAI-compatible frontend (``<base>/v1``), the production alternative (see README.md).

``model_info.id`` is the replica id, the same id the sidecar and the routing plugin use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from plugins.triton_provider.dialects import dialect as get_dialect
from plugins.triton_provider.settings import (
    MODEL_INFO_KEY,
    PROVIDER,
    TritonProviderSettings,
    deployment_overrides,
    effective_settings,
)

REPLICA_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
TRITON_MODEL = re.compile(r"^[A-Za-z0-9_.\-]+$")
# Triton's OpenAI frontend does not check keys, but the openai client insists on one.
DUMMY_API_KEY = "not-used"


def _check(model_name: str, replica_id: str, api_base: str) -> str:
    if not model_name:
        raise ValueError("model_name must not be empty")
    if not REPLICA_ID.match(replica_id):
        raise ValueError(f"replica_id must match {REPLICA_ID.pattern}, got {replica_id!r}")
    parts = urlsplit(api_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"api_base must be an http(s) URL, got {api_base!r}")
    return api_base.rstrip("/")


def triton_deployment(
    model_name: str,
    replica_id: str,
    api_base: str,
    triton_model: str,
    *,
    dialect: str | None = None,
    provider_settings: Mapping[str, Any] | None = None,
    model_info: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A deployment of ``model_name`` on one replica, served by ``triage_triton``.

    ``dialect`` is the Triton model's input naming: ``inflight_batcher_llm`` (NVIDIA's stock
    ``ensemble``, the default when unset) or ``llmapi`` (the LLM-API ``tensorrt_llm`` model);
    ``provider_settings`` are per-deployment overrides of ``TritonProviderSettings``. Both are
    validated here (an unknown dialect is a ValueError naming the known ones) and stored under
    ``model_info.triage_triton``; ``extra`` goes into ``litellm_params`` (``rpm``, ``tpm``,
    ``timeout``, ...).
    """
    base = _check(model_name, replica_id, api_base)
    if not TRITON_MODEL.match(triton_model):
        raise ValueError(f"triton_model must match {TRITON_MODEL.pattern}, got {triton_model!r}")
    info: dict[str, Any] = {**(model_info or {}), "id": replica_id}
    settings = dict(provider_settings or {})
    if dialect is not None:
        if settings.get("dialect", dialect) != dialect:
            raise ValueError(
                f"dialect={dialect!r} contradicts provider_settings dialect {settings['dialect']!r}"
            )
        settings["dialect"] = get_dialect(dialect).name
    if settings:
        overrides = {MODEL_INFO_KEY: settings}
        # fail while building the config, not on the first request
        effective_settings(
            TritonProviderSettings.model_construct(), deployment_overrides(overrides)
        )
        info.update(overrides)
    return {
        "model_name": model_name,
        "litellm_params": {**extra, "model": f"{PROVIDER}/{triton_model}", "api_base": base},
        "model_info": info,
    }


def openai_frontend_deployment(
    model_name: str,
    replica_id: str,
    api_base: str,
    served_model: str,
    *,
    api_key: str = DUMMY_API_KEY,
    model_info: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A deployment on Triton's OpenAI-compatible frontend: ``openai/<served_model>`` at ``/v1``.

    ``api_base`` may be given with or without the ``/v1`` suffix.
    """
    base = _check(model_name, replica_id, api_base)
    if not served_model:
        raise ValueError("served_model must not be empty")
    if not base.endswith("/v1"):
        base = f"{base}/v1"
    return {
        "model_name": model_name,
        "litellm_params": {
            **extra,
            "model": f"openai/{served_model}",
            "api_base": base,
            "api_key": api_key,
        },
        "model_info": {**(model_info or {}), "id": replica_id},
    }
