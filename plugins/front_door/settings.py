"""Settings of the front door: env ``TRIAGE_FRONT_DOOR_*``, validated when the proxy starts."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MODEL_INFO_MAX_OUTPUT = "max_output_tokens"
"""LiteLLM's ``model_info`` field for a model's largest completion, read per deployment."""


class FrontDoorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRIAGE_FRONT_DOOR_", extra="forbid")

    max_body_mb: float = Field(
        default=16.0,
        gt=0,
        le=1024,
        description="largest request body, any route (413 beyond it, counted while it streams "
        "in, before anything parses it)",
    )
    max_tokens_limit: int = Field(
        default=8192,
        ge=1,
        description="largest max_tokens / max_completion_tokens for a model whose deployments "
        f"do not set model_info.{MODEL_INFO_MAX_OUTPUT} (400 beyond it)",
    )
    shed: bool = Field(
        default=True,
        description="answer 503 before LiteLLM's per-request work when the admission plugin's "
        "memo already says the request would be shed (known keys only)",
    )
    pipeline_size: int = Field(
        default=8,
        ge=1,
        le=10_000,
        description="requests at once between the front door and the admission gate (in "
        "LiteLLM's per-request work); the rest wait in a FIFO at the front door, where a flood "
        "is shed without that work",
    )
    pipeline_hold_max_ms: int = Field(
        default=500,
        ge=1,
        description="longest a request holds its pipeline slot (for routes with no gate)",
    )
    cancel_on_disconnect: bool = Field(
        default=True,
        description="a client that disconnects cancels its request: the upstream call is "
        "closed and its admission ticket and routing reservation are given back",
    )
    limits_cache_s: float = Field(
        default=5.0, ge=0, description="how long a model's max_tokens limit is cached"
    )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
