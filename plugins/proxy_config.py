"""The LiteLLM proxy config, generated from the fleet: deployments, both plugins, keys.

One deployment per Triton replica (``model_info.id`` = the replica id the sidecar publishes
under, so the routing plugin can join LiteLLM's deployments with the Redis load store). The
plugins get their settings through ``TRIAGE_*`` environment variables (``proxy_env``), never
through the YAML, so one YAML works for N proxy processes and secrets stay out of files.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, Field

from core.paths import REPO_ROOT
from plugins.triton_provider.deployments import triton_deployment

ROUTING_CALLBACK = "plugins.routing.proxy_callback.routing"
ADMISSION_CALLBACK = "plugins.admission.proxy_callback.admission"
MODEL_ACCESS_CALLBACK = "plugins.auth.model_access.model_access"
DISCLOSURE_CALLBACK = "plugins.auth.proxy_callback.disclosure"
CATALOGUE_CALLBACK = "plugins.catalogue.proxy_callback.catalogue"
CUSTOM_AUTH = "plugins.auth.custom_auth.user_api_key_auth"
TRITON_PROVIDER = "triage_triton"
TRITON_HANDLER = "plugins.triton_provider.handler.triton_generate"


@dataclass(frozen=True)
class ReplicaEndpoint:
    replica_id: str
    api_base: str
    """Triton's HTTP endpoint, e.g. http://127.0.0.1:8000"""


class ProxyOptions(BaseModel):
    """How the proxy routes: ``least-busy`` (the plugin) or LiteLLM's own strategies."""

    routing: Literal["triage", "simple-shuffle", "least-busy"] = "triage"
    admission: bool = True
    num_retries: int = Field(default=2, ge=0)
    request_timeout_s: float = Field(default=600.0, gt=0)
    prometheus: bool = True
    otel: bool = False
    """LiteLLM's OpenTelemetry callback (``OTEL_EXPORTER``, ``OTEL_ENDPOINT``...; needs
    ``pip install "triage[otel]"``): its request spans, with the plugins' spans inside
    (``plugins/tracing.py``)."""
    catalogue_file: Path | None = None
    """A model catalogue (``plugins/catalogue``): its models get a deployment on every server
    they may run on, loaded there on first request."""
    max_output_tokens: int | None = Field(default=4096, ge=1)
    """Every deployment's ``model_info.max_output_tokens``: the front door answers 400 to a
    larger ``max_tokens`` (None: the front door's ``TRIAGE_FRONT_DOOR_MAX_TOKENS_LIMIT``)."""
    router_redis_url: str | None = None
    """Redis for LiteLLM's own Router state (``router_settings`` ``redis_host`` / ``redis_port`` /
    ``redis_password``): how LiteLLM shares ``least-busy`` counts and cooldowns across proxy
    processes. None: each process keeps its own, in memory."""


def new_master_key() -> str:
    return "sk-triage-master-" + secrets.token_urlsafe(24)


def build_proxy_config(
    model_name: str,
    triton_model: str,
    replicas: list[ReplicaEndpoint],
    options: ProxyOptions | None = None,
    dialect: str | None = None,
    provider_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The proxy's config: ``model_name`` served by ``triton_model`` on ``replicas``, in the
    provider's ``dialect`` (``plugins/triton_provider/dialects.py``; None: its default), with
    ``provider_settings`` (``TritonProviderSettings`` fields) on every deployment."""
    opts = options or ProxyOptions()
    # order matters for pre-call hooks: refuse a key's forbidden model (403) before it takes
    # an admission slot; the routing hook only (re-)installs the strategy
    callbacks: list[str] = [MODEL_ACCESS_CALLBACK]
    if opts.admission:
        callbacks.append(ADMISSION_CALLBACK)
    if opts.routing == "triage":
        callbacks.insert(0, ROUTING_CALLBACK)
    if opts.catalogue_file is not None:  # after the key's model check, before admission
        callbacks.insert(callbacks.index(MODEL_ACCESS_CALLBACK) + 1, CATALOGUE_CALLBACK)
    # last of the plugins: its failure hook only cleans errors no other plugin has replaced
    callbacks.append(DISCLOSURE_CALLBACK)
    if opts.prometheus:
        callbacks.append("prometheus")
    if opts.otel:
        callbacks.append("otel")
    router_settings: dict[str, Any] = {
        # with "triage" the plugin replaces the chooser; the router still filters
        # (cooldowns, health) before it, with LiteLLM's defaults
        "routing_strategy": "least-busy" if opts.routing == "least-busy" else "simple-shuffle",
        "num_retries": opts.num_retries,
    }
    limits = (
        {"max_output_tokens": opts.max_output_tokens} if opts.max_output_tokens is not None else {}
    )
    if opts.router_redis_url is not None:
        router_settings.update(router_redis_settings(opts.router_redis_url))
    return {
        "model_list": [
            triton_deployment(
                model_name,
                r.replica_id,
                r.api_base,
                triton_model,
                dialect=dialect,
                provider_settings=provider_settings,
                model_info=limits,
            )
            for r in replicas
        ]
        + catalogue_model_list(opts.catalogue_file),
        "litellm_settings": {
            "custom_provider_map": [
                {"provider": TRITON_PROVIDER, "custom_handler": TRITON_HANDLER}
            ],
            "callbacks": callbacks,
            "request_timeout": opts.request_timeout_s,
        },
        "router_settings": router_settings,
        "general_settings": {
            "master_key": "os.environ/LITELLM_MASTER_KEY",
            "custom_auth": CUSTOM_AUTH,
            # no password form takes the master key: LiteLLM's /login accepts it as the admin
            # UI's password (UI_USERNAME / UI_PASSWORD default), and the admin UI is off
            "disable_env_credential_login": True,
        },
    }


def router_redis_settings(redis_url: str) -> dict[str, Any]:
    """``redis://[:password@]host:port[/db]`` as LiteLLM's documented ``router_settings`` keys."""
    url = urlsplit(redis_url)
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        raise ValueError(f"not a redis:// URL: {redis_url!r}")
    out: dict[str, Any] = {"redis_host": url.hostname, "redis_port": url.port or 6379}
    if url.password:
        out["redis_password"] = url.password
    return out


def catalogue_model_list(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    from plugins.catalogue.deployments import catalogue_deployments
    from plugins.catalogue.settings import Catalogue

    return catalogue_deployments(Catalogue.load(path))


API_DOCS_OFF = {"NO_DOCS": "True", "NO_REDOC": "True", "NO_OPENAPI": "True"}
"""LiteLLM serves Swagger UI at ``/``, ReDoc at ``/redoc`` and ``/openapi.json`` to anyone
unless these are set (``get_docs_url`` / ``get_redoc_url`` / ``get_openapi_url`` in
``litellm/proxy/utils.py``, read when ``proxy_server`` creates its app)."""


STORE_USERS = ("ROUTING", "ADMISSION", "KEYS", "CATALOGUE")
"""The plugins that read the load store, by their settings' env prefix (``TRIAGE_<NAME>_``)."""


def proxy_env(
    redis_url: str,
    key_prefix: str,
    master_key: str,
    catalogue_file: Path | None = None,
    api_docs: bool = False,
) -> dict[str, str]:
    """Environment of a proxy process: LiteLLM's own variables and the plugins' settings.

    ``api_docs``: serve LiteLLM's API docs (``/``, ``/redoc``, ``/openapi.json``) without a key;
    off by default (``plugins/auth/README.md``, "What is public"). The admin UI is always off
    (``DISABLE_ADMIN_UI``): it needs LiteLLM's database and does not take the offline keys."""
    return {
        "LITELLM_MASTER_KEY": master_key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        **({} if api_docs else API_DOCS_OFF),
        "DISABLE_ADMIN_UI": "True",
        # a crash in a C extension leaves each thread's Python stack in the proxy's log
        "PYTHONFAULTHANDLER": "1",
        # each plugin names its own store (they may differ); here all share the stack's
        **{
            f"TRIAGE_{plugin}_{name}": value
            for plugin in STORE_USERS
            for name, value in (("REDIS_URL", redis_url), ("KEY_PREFIX", key_prefix))
        },
        **({"TRIAGE_CATALOGUE_FILE": str(catalogue_file)} if catalogue_file else {}),
        "PYTHONPATH": str(REPO_ROOT),
    }


def write_proxy_config(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
