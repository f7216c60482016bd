"""Per-key model allow-list for keys of the offline key store: a LiteLLM pre-call hook.

Proxy config::

    litellm_settings:
      callbacks: ["plugins.auth.model_access.model_access"]

With ``custom_auth`` LiteLLM skips its own key checks (unless ``custom_auth_run_common_checks``),
so this hook enforces ``UserAPIKeyAuth.models`` for keys made by ``plugins.auth.custom_auth``
(``metadata["key_source"] == "triage-keystore"``): a model outside a non-empty list → **403**
``{"error": {"message", "type": "key_model_access_denied", "param": "model", "code": "403"}}``.
An empty list allows every model. Entries match exactly, or as shell-style patterns when they
contain ``*`` (``"llama-*"``); ``"*"`` and LiteLLM's ``"all-proxy-models"`` allow everything.

Keys from LiteLLM's database are left alone: LiteLLM has checked them already, with access
groups and team models this hook knows nothing about. The hook also hides, for the same keys,
disallowed models from ``/v1/models``, ``/v1/models/{id}``, ``/model/info`` and
``/model_group/info``, and names of the key's list that no deployment serves (LiteLLM lists a
key's ``models`` as given, ``get_key_models`` in ``litellm/proxy/auth/model_checks.py``).

``plugins.auth.custom_auth`` runs the same model check at authentication, before LiteLLM's route
handler (so ``/v1/messages`` answers it in the OpenAI envelope too); this hook is the second line
for the paths that bypass it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import status
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import ProxyErrorTypes, ProxyException, UserAPIKeyAuth
from litellm.types.utils import CallTypesLiteral

from plugins.auth.identity import KEY_SOURCE, key_id_of

if TYPE_CHECKING:
    from litellm.caching.caching import DualCache

log = logging.getLogger("triage.auth.model_access")

ALL_MODELS = frozenset({"*", "all-proxy-models"})


def model_allowed(model: str, allowed: Sequence[str]) -> bool:
    """Whether ``model`` is in the allow-list (empty = all; ``*`` patterns; all-model markers)."""
    if not allowed:
        return True
    for entry in allowed:
        if entry in ALL_MODELS or entry == model:
            return True
        if "*" in entry and fnmatchcase(model, entry):
            return True
    return False


class _Router(Protocol):
    def get_model_list(
        self, model_name: str | None = None, team_id: str | None = None
    ) -> list[Any] | None: ...


def proxy_router() -> _Router | None:
    """The LiteLLM proxy's router, when this process is the proxy and has one (no import: a
    process that has not loaded the proxy has no router to ask)."""
    proxy_server = sys.modules.get("litellm.proxy.proxy_server")
    router = getattr(proxy_server, "llm_router", None) if proxy_server is not None else None
    return router if router is not None and hasattr(router, "get_model_list") else None


def model_served(model: str, router: _Router | None = None) -> bool | None:
    """Whether a deployment serves ``model`` (by name, alias, routing group or wildcard: the
    channels of ``Router.get_model_list``); None when there is no router to ask."""
    router = router if router is not None else proxy_router()
    if router is None:
        return None
    return bool(router.get_model_list(model_name=model))


def enforced_for(user_api_key_dict: UserAPIKeyAuth) -> bool:
    """Only keys of the offline store: LiteLLM enforces its own DB keys' lists itself."""
    metadata = user_api_key_dict.metadata
    return isinstance(metadata, dict) and metadata.get("key_source") == KEY_SOURCE


def model_access_denied(model: str, user_api_key_dict: UserAPIKeyAuth) -> ProxyException:
    allowed = ", ".join(user_api_key_dict.models)
    alias = user_api_key_dict.key_alias or key_id_of(user_api_key_dict)
    return ProxyException(
        message=f"API key '{alias}' is not allowed to use model '{model}'; "
        f"this key may use: {allowed}.",
        type=ProxyErrorTypes.key_model_access_denied,
        param="model",
        code=status.HTTP_403_FORBIDDEN,
    )


class ModelAccessHook(CustomLogger):
    """Rejects (403) requests for a model outside the key's ``models`` list."""

    async def async_pre_call_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        cache: DualCache,
        data: dict,
        call_type: CallTypesLiteral,
    ) -> Exception | str | dict | None:
        if not enforced_for(user_api_key_dict):
            return None
        model = data.get("model")
        if not isinstance(model, str) or not model:
            return None
        allowed = list(user_api_key_dict.models)
        if model_allowed(model, allowed):
            return None
        log.info(
            "refused model %r for key %s (%s) on %s: allowed %s",
            model,
            key_id_of(user_api_key_dict),
            user_api_key_dict.key_alias,
            call_type,
            allowed,
        )
        raise model_access_denied(model, user_api_key_dict)

    async def async_filter_listed_models(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        model_names: Sequence[str],
    ) -> Sequence[str]:
        if not enforced_for(user_api_key_dict):
            return model_names
        allowed = list(user_api_key_dict.models)
        return [
            name
            for name in model_names
            if model_allowed(name, allowed) and model_served(name) is not False
        ]


model_access = ModelAccessHook()
"""The instance to list in ``litellm_settings.callbacks``."""
