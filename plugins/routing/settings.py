"""Settings of the routing plugin: env ``TRIAGE_ROUTING_*`` (set by the proxy config generator).

The Redis connection pool (size, wait) is shared by every proxy-side client: ``TRIAGE_REDIS_*``
(``core.redis_client.RedisPoolSettings``)."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.keyschema import DEFAULT_PREFIX
from core.redis_url import RedisUrl
from plugins.routing.leases import (
    DEFAULT_LEASE_MS,
    DEFAULT_MAX_HOLD_MS,
    DEFAULT_RENEW_MS,
    check_lease_settings,
)
from plugins.routing.policy import MAX_PROMPT_BLOCKS, PolicyParams

_POLICY = PolicyParams()
CHARS_PER_TOKEN = 4.0
"""Characters per token for the index's bound (a block of 256 characters ~ 64 tokens)."""


class RoutingSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_ROUTING_", extra="forbid", hide_input_in_errors=True
    )

    redis_url: RedisUrl = Field(description="the load store, e.g. redis://127.0.0.1:6390/0")
    key_prefix: str = DEFAULT_PREFIX
    # the policy's knobs: PolicyParams holds their defaults (and checks them again)
    stale_after_ms: int = Field(
        default=_POLICY.stale_after_ms, ge=0, description="older replica state = unknown"
    )
    kv_threshold: float = Field(default=_POLICY.kv_threshold, ge=0.0, lt=1.0)
    kv_weight: float = Field(default=_POLICY.kv_weight, ge=0.0)
    unknown_score: float = Field(
        default=_POLICY.unknown_score, description="score of a replica with no state"
    )
    default_service_ms: float = Field(default=_POLICY.default_service_ms, gt=0.0)
    tie_tolerance: float = Field(
        default=_POLICY.tie_tolerance, ge=0.0, le=1.0, description="near-equal = tied"
    )
    prefill_ms_per_token: float = Field(
        default=_POLICY.prefill_ms_per_token,
        ge=0.0,
        description="prefill time of one prompt token on a replica (ms): what a cached prompt "
        "block saves in the score",
    )
    prefix_affinity: bool = Field(
        default=True,
        description="keep a prefix index per replica in Redis and credit a replica with the "
        "prompt blocks it holds (plugins/routing/README.md)",
    )
    prefix_salt: SecretStr | None = Field(
        default=None,
        description="the secret the prompt-block hashes are keyed with, the same for every "
        "proxy; default: derived from LITELLM_MASTER_KEY (affinity off without either)",
    )
    prefix_block_chars: int = Field(
        default=256, ge=16, description="characters per prompt block (about 64 tokens)"
    )
    prefix_max_blocks: int = Field(
        default=256, ge=1, le=MAX_PROMPT_BLOCKS, description="prompt blocks hashed per request"
    )
    prefix_index_blocks: int = Field(
        default=_POLICY.prefix_index_blocks,
        ge=1,
        description="index bound per replica when it publishes no KV capacity",
    )
    prefix_ttl_ms: int = Field(default=_POLICY.prefix_ttl_ms, ge=1000)
    expected_output_tokens: int = Field(
        default=256, ge=1, description="a request's expected output when it sets no max_tokens"
    )
    lease_ms: int = Field(
        default=DEFAULT_LEASE_MS,
        ge=1000,
        description="a reservation counts for this long after its last renewal: the longest a "
        "dead proxy's reservation, or one whose release was lost, pins a phantom request on "
        "its replica; shorter heals sooner, but needs renewals that are never that late",
    )
    renew_ms: int = Field(
        default=DEFAULT_RENEW_MS,
        ge=100,
        description="every this long the process renews the leases of all the reservations it "
        "holds, in one Redis call (at most lease_ms / 3)",
    )
    max_hold_ms: int = Field(
        default=DEFAULT_MAX_HOLD_MS,
        ge=1000,
        description="a reservation this process has held this long is taken for a lost release "
        "(logged, no longer renewed): keep it above the longest request, streams included",
    )
    redis_timeout_ms: int = Field(default=1000, ge=1, description="connect/read timeout")
    redis_retry_ms: int = Field(
        default=1000, ge=0, description="after a Redis failure, per-process counts for this long"
    )
    log_interval_s: float = Field(default=10.0, gt=0, description="Redis-down log interval")

    @model_validator(mode="after")
    def _leases(self) -> RoutingSettings:
        check_lease_settings(self.lease_ms, self.renew_ms, self.max_hold_ms)
        return self

    def policy(self) -> PolicyParams:
        return PolicyParams(
            stale_after_ms=self.stale_after_ms,
            kv_threshold=self.kv_threshold,
            kv_weight=self.kv_weight,
            unknown_score=self.unknown_score,
            default_service_ms=self.default_service_ms,
            tie_tolerance=self.tie_tolerance,
            prefill_ms_per_token=self.prefill_ms_per_token,
            prefix_index_blocks=self.prefix_index_blocks,
            block_tokens=self.prefix_block_chars / CHARS_PER_TOKEN,
            prefix_ttl_ms=self.prefix_ttl_ms,
        )
