"""Settings of the offline key store: env ``TRIAGE_KEYS_*`` (the CLI flags use the same names)."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.keyschema import DEFAULT_PREFIX
from core.redis_url import RedisUrl

PRIORITY_HIGHEST = 0
PRIORITY_LOWEST = 9
DEFAULT_PRIORITY = 1
"""Priority tiers of a key: 0 is served first, 9 last; new keys get 1 (0 is the admin's)."""


class KeysSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_KEYS_", extra="forbid", hide_input_in_errors=True
    )

    redis_url: RedisUrl = Field(
        description="the Redis that holds the key records: redis://[:password@]host:port/db "
        "or redis+sentinel://host:port,.../service/db"
    )
    key_prefix: str = Field(default=DEFAULT_PREFIX, description="prefix of every Redis key")
    cache_ttl_s: float = Field(
        default=5.0,
        ge=0.0,
        le=300.0,
        description="how long a proxy trusts a looked-up key before asking Redis again "
        "(so a revocation takes effect within this time); 0 disables the cache",
    )
    negative_cache_ttl_s: float = Field(
        default=1.0,
        ge=0.0,
        le=60.0,
        description="how long an unknown key stays unknown without asking Redis again",
    )
    cache_max_entries: int = Field(default=10_000, ge=1, description="in-process cache bound")
    stale_if_error_s: float = Field(
        default=600.0,
        ge=0.0,
        le=86_400.0,
        description="while Redis is unreachable, keep accepting a key that was valid at most "
        "this long ago (so a Redis outage does not lock out every client); 0 disables",
    )
    redis_timeout_s: float = Field(
        default=1.0, gt=0.0, le=30.0, description="connect and command timeout"
    )
    restrict_routes: bool = Field(
        default=True,
        description="keys other than the master key may call only LLM API and model-info "
        "routes (LiteLLM skips its own route checks for custom_auth)",
    )
    admin_priority: int = Field(
        default=PRIORITY_HIGHEST,
        ge=PRIORITY_HIGHEST,
        le=PRIORITY_LOWEST,
        description="priority of requests made with LITELLM_MASTER_KEY",
    )

    @field_validator("key_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        if any(ch.isspace() for ch in value) or "*" in value:
            raise ValueError("must not contain whitespace or '*'")
        return value
