"""The model catalogue (one YAML file) and the plugin's settings (env ``TRIAGE_CATALOGUE_*``).

The file names every Triton server the gateway may load models on and every model it may load::

    servers:
      server-1: {api_base: "http://10.0.0.1:8000"}
      server-2: {api_base: "http://10.0.0.2:8000"}
    models:
      llama-8b:                      # the name clients use
        triton_model: ensemble       # the model in the servers' repositories
        servers: [server-1, server-2]  # where it may run (default: every server)
        pinned_on: [server-2]        # preferred, in order
        min_devices: 2               # tensor-parallel size
        min_device_memory_mb: 40000
        dialect: inflight_batcher_llm  # or llmapi (NVIDIA's LLM-API model); the default

A server's topology (device count and memory) is not in the file: its sidecar publishes it.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.keyschema import DEFAULT_PREFIX
from core.redis_url import RedisUrl
from plugins.triton_provider.dialects import DEFAULT_DIALECT, DialectName

NAME = r"^[A-Za-z0-9_.\-]{1,40}$"


class CatalogueServer(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    api_base: str = Field(pattern=r"^https?://", description="the server's Triton HTTP endpoint")


class CatalogueModel(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    triton_model: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    servers: list[str] = Field(default_factory=list, description="empty: every server")
    pinned_on: list[str] = Field(default_factory=list, description="preferred servers, in order")
    min_devices: int = Field(default=1, ge=1, description="devices one replica needs (TP size)")
    min_device_memory_mb: int = Field(default=0, ge=0, description="memory per device")
    dialect: DialectName = Field(
        default=DEFAULT_DIALECT,
        description="the Triton model's input names: NVIDIA's stock inflight_batcher_llm "
        "ensemble or the llmapi model",
    )


class Catalogue(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    servers: dict[str, CatalogueServer]
    models: dict[str, CatalogueModel]

    @model_validator(mode="after")
    def _references(self) -> Catalogue:
        import re

        for name in [*self.servers, *self.models]:
            if not re.match(NAME, name):
                raise ValueError(f"name {name!r} must match {NAME}")
        for name, model in self.models.items():
            for field in ("servers", "pinned_on"):
                unknown = [s for s in getattr(model, field) if s not in self.servers]
                if unknown:
                    raise ValueError(f"models.{name}.{field}: unknown servers {unknown}")
            outside = [s for s in model.pinned_on if model.servers and s not in model.servers]
            if outside:
                raise ValueError(f"models.{name}.pinned_on: {outside} not in its servers")
        return self

    def servers_of(self, model: str) -> list[str]:
        """Where ``model`` may run: its ``servers``, else every server (file order)."""
        return list(self.models[model].servers or self.servers)

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})


def replica_id(server_id: str, model: str) -> str:
    """The replica (LiteLLM deployment ``model_info.id``) of ``model`` on ``server_id``."""
    return f"{server_id}.{model}"


class CatalogueSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_CATALOGUE_", extra="forbid", hide_input_in_errors=True
    )

    file: Path = Field(description="the catalogue YAML")
    redis_url: RedisUrl = Field(description="the load store")
    key_prefix: str = DEFAULT_PREFIX
    load_timeout_s: float = Field(default=120.0, gt=0, description="one load's deadline")
    cooldown_s: float = Field(
        default=60.0, gt=0, description="after a failed load, the server is not retried for it"
    )
    confirm_timeout_s: float = Field(
        default=2.0, ge=0, description="after a load, wait this long for the sidecar's report"
    )
    poll_ms: int = Field(default=100, ge=10, description="waiters re-check the load this often")
    stale_after_ms: int = Field(default=1000, ge=0, description="older server/replica state")
    retry_after_s: float = Field(
        default=5.0, gt=0, description="Retry-After when no feasible server is healthy"
    )
    unload_lru: bool = Field(
        default=False,
        description="unload the least recently used idle model when a server cannot take one",
    )
    redis_timeout_ms: int = Field(default=2000, ge=1)

    def catalogue(self) -> Catalogue:
        return Catalogue.load(self.file)
