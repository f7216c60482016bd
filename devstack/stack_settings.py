"""Settings of the embedded stack (``triage up``): env ``TRIAGE_STACK_*`` or the same flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.keyschema import DEFAULT_PREFIX
from core.speeds import check_speeds


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_STACK_", cli_kebab_case=True, extra="forbid"
    )

    replicas: int = Field(default=2, ge=1, le=16, description="Triton stand-in replicas")
    speeds: list[float] = Field(
        default_factory=list,
        description="speed factor per replica, e.g. [1.0,1.0,0.5]; default all 1.0",
    )
    model: str = Field(default="standin", pattern=r"^[A-Za-z0-9_.\-]+$")
    dialect: Literal["ensemble", "llmapi"] = Field(
        default="ensemble",
        description="stand-in shape: NVIDIA's stock ensemble over a tensorrt_llm engine, or the "
        "LLM-API model (no engine gauges; Triton's cancel reaches it)",
    )
    catalogue: list[str] = Field(
        default_factory=lambda: ["standin-cold"],
        description="catalogued models besides MODEL: in every replica's Triton repository but "
        "not loaded, listed by /v1/models, loaded on their first request (plugins/catalogue); "
        "[] for none",
    )
    max_active: int = Field(default=4, ge=1)
    engine_queue_size: int = Field(default=8, ge=0)
    decode_ms_per_token: float = Field(default=20.0, gt=0)
    batch_slowdown: float = Field(
        default=0.05, ge=0, description="stand-in step cost per extra sequence"
    )
    prefill_ms_per_token: float = Field(default=0.2, ge=0, description="stand-in prefill cost")
    kv_cache_blocks: int = Field(
        default=512, ge=1, description="stand-in KV-cache blocks per replica (64 tokens each)"
    )
    poll_interval_ms: int = Field(default=250, ge=20)
    key_prefix: str = DEFAULT_PREFIX
    workdir: Path | None = Field(default=None, description="logs and state; default a temp dir")
    ready_timeout_s: float = Field(default=90.0, gt=0)
    proxies: int = Field(
        default=1, ge=0, le=8, description="LiteLLM proxy processes sharing Redis (0: none)"
    )
    routing: Literal["triage", "simple-shuffle", "least-busy"] = Field(
        default="triage",
        description="triage = the least-busy plugin; or LiteLLM's own strategy, to compare",
    )
    num_retries: int = Field(default=2, ge=0, description="router retries on another replica")
    proxy_ready_timeout_s: float = Field(default=120.0, gt=0)
    redis_auth: bool = Field(
        default=True,
        description="a random Redis password, and a sidecar and a proxy ACL user (Redis >= 6); "
        "false: no authentication (any local client may write the key store)",
    )
    redis_sentinel: bool = Field(
        default=False,
        description="Redis as a primary, a replica and three Sentinels; every part connects "
        "through the Sentinels (redis+sentinel://) and follows a failover",
    )
    supervise: bool = Field(
        default=True,
        description="triage up restarts a crashed replica, sidecar, proxy or Redis (backoff)",
    )

    @field_validator("catalogue")
    @classmethod
    def _catalogue(cls, names: list[str], info: ValidationInfo) -> list[str]:
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise ValueError(f"{name!r}: a model name is letters, digits, '_', '.', '-'")
        if info.data.get("model") in names or len(set(names)) != len(names):
            raise ValueError("catalogued models must differ from MODEL and from each other")
        return names

    @field_validator("speeds")
    @classmethod
    def _speeds(cls, speeds: list[float], info: ValidationInfo) -> list[float]:
        return check_speeds(speeds, info.data.get("replicas", 2))
