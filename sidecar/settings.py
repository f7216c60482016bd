"""Sidecar settings: env ``TRIAGE_SIDECAR_*`` and the same names as CLI flags (kebab-case)."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.keyschema import DEFAULT_PREFIX, TTL_POLLS
from core.redis_url import RedisUrl
from sidecar.triton_metrics import DEFAULT_ARRIVALS_MODEL


class SidecarSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_SIDECAR_",
        hide_input_in_errors=True,  # a Redis URL may hold a password
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
    )

    replica_id: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description="id routers use")
    model: str = Field(min_length=1, description="Triton model the requests go to")
    engine_model: str | None = Field(
        default=None,
        description="model whose nv_trt_llm_* gauges to read (tensorrt_llm behind an ensemble); "
        "default: the routed model if it has them, else the only model that has them",
    )
    arrivals_model: str | None = Field(
        default=DEFAULT_ARRIVALS_MODEL,
        description="model whose nv_inference_request_success counts the requests handed to the "
        "engine (the stock ensemble's preprocessing step); empty: no hidden-queue estimate",
    )
    triton_url: str = Field(description="Triton HTTP base URL, e.g. http://127.0.0.1:8000")
    metrics_url: str | None = Field(default=None, description="default: Triton host, port 8002")
    api_base: str | None = Field(default=None, description="what routers call; default triton_url")
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    key_prefix: str = DEFAULT_PREFIX
    poll_interval_ms: int = Field(default=250, ge=20, le=60_000)
    poll_timeout_ms: int = Field(default=500, ge=10)
    unhealthy_after: int = Field(default=3, ge=1, description="consecutive failed polls")
    service_window_s: float = Field(default=10.0, gt=0)
    max_active: int | None = Field(
        default=None, ge=1, description="slots when the metrics do not say (LLM-API path)"
    )
    backlog_window_s: float = Field(
        default=30.0, gt=0, description="how long a measured counter drift is remembered"
    )
    server_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
        description="the Triton server's id (its models' sidecars share it); default replica_id",
    )
    device_count: int | None = Field(
        default=None, ge=0, description="devices the server has; default: nvidia-smi, else 1 (CPU)"
    )
    device_memory_mb: int | None = Field(
        default=None, ge=0, description="memory per device; default: nvidia-smi, else host memory"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=9400, ge=0, le=65535)
    log_level: str = "info"

    @model_validator(mode="after")
    def _derive(self) -> SidecarSettings:
        parts = urlsplit(self.triton_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"triton_url must be an http(s) URL, got {self.triton_url!r}")
        self.triton_url = self.triton_url.rstrip("/")
        if self.metrics_url is None:
            self.metrics_url = f"{parts.scheme}://{parts.hostname}:8002/metrics"
        if self.api_base is None:
            self.api_base = self.triton_url
        if self.arrivals_model == "":
            self.arrivals_model = None
        if self.server_id is None:
            self.server_id = self.replica_id
        return self

    @property
    def ttl_ms(self) -> int:
        return TTL_POLLS * self.poll_interval_ms
