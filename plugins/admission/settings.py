"""Settings of the admission plugin: env ``TRIAGE_ADMISSION_*`` (set by the proxy config).

The Redis connection pool (size, wait) is shared by every proxy-side client: ``TRIAGE_REDIS_*``
(``core.redis_client.RedisPoolSettings``)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.keyschema import DEFAULT_PREFIX
from core.redis_url import RedisUrl
from plugins.admission.retry_after import RetryAfterBand
from plugins.routing.leases import (
    DEFAULT_LEASE_MS,
    DEFAULT_MAX_HOLD_MS,
    DEFAULT_RENEW_MS,
    check_lease_settings,
)

DEADLINE_HEADER = "x-triage-ttft-deadline-ms"
"""A request's own time-to-first-token deadline (ms), over its tier's (``ttft_deadline_ms``)."""


class AdmissionSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_ADMISSION_", extra="forbid", hide_input_in_errors=True
    )

    redis_url: RedisUrl = Field(description="the load store (shared by every proxy process)")
    key_prefix: str = DEFAULT_PREFIX
    queue_allowance: int = Field(
        default=4, ge=0, description="per healthy replica, admitted work beyond max_active"
    )
    unknown_replica_slots: int = Field(
        default=4,
        ge=0,
        description="capacity counted for a replica with no fresh state (sidecar down)",
    )
    stale_after_ms: int = Field(default=1000, ge=0, description="as the routing plugin's")
    max_queue: int = Field(default=64, ge=0, description="gateway wait queue depth per model")
    priority_max_queue: dict[int, int] = Field(
        default_factory=dict,
        description="queue depth limit per priority tier, e.g. {2: 16}: tier 2 may hold at "
        "most 16 places (tiers not listed: max_queue)",
    )
    fair_share: bool = Field(
        default=True,
        description="within a priority tier, serve flows (keys, teams, tenants) by the tokens "
        "they have received, weighted (metadata weight); false: first come, first served "
        "within a tier (as before; no per-flow cap, no push-out)",
    )
    flow_max_queue: int | None = Field(
        default=None,
        ge=0,
        description="the most places one flow (a key, its team or the tenant its metadata "
        "names) may hold in a model's queue (503 flow_queue_full beyond; default none: a full "
        "queue already gives the last place of the flow holding the most to a request of a "
        "smaller one); a key's metadata max_queued bounds its own flow (429 beyond)",
    )
    fair_default_output_tokens: int = Field(
        default=256,
        ge=1,
        description="the output tokens a request without max_tokens counts for in the fair "
        "share between flows (its prompt tokens count too)",
    )
    ttft_deadline_ms: dict[int, int] = Field(
        default_factory=dict,
        description="time-to-first-token deadline per priority tier, e.g. {0: 2000}: a request "
        "of that tier whose expected wait in the queue exceeds it is answered 503 "
        "ttft_deadline at once, and none is granted after it (a request may set its own with "
        "the x-triage-ttft-deadline-ms header)",
    )
    max_wait_ms: int = Field(default=10_000, ge=0, description="longest wait in the queue")
    expected_wait_fraction: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="a request whose expected wait in the queue ((ahead + 1) / the queue's "
        "measured rate) exceeds this fraction of max_wait is shed at once (503 expected_wait) "
        "instead of waiting and being shed after max_wait; 0 = off",
    )
    shed_memo_ms: int = Field(
        default=1000,
        ge=0,
        description="for this long after Redis answered (queued behind N, or a wait too long), "
        "this process sheds the next requests of that model and priority itself (no Redis "
        "round trip) while N less the grants seen since is still over the expected-wait "
        "limit; 0 = always ask Redis",
    )
    poll_ms: int = Field(
        default=250,
        ge=1,
        description="a waiter's fallback re-check (its grant wakes it at once; the poll finds a "
        "lost grant message and capacity that grew without a release, and keeps its place)",
    )
    lease_ms: int = Field(
        default=DEFAULT_LEASE_MS,
        ge=1000,
        description="an admission ticket counts for this long after its last renewal: the "
        "longest a dead proxy's ticket, or one whose release was lost (a Redis outage), holds "
        "capacity; shorter heals sooner, but needs renewals that are never that late",
    )
    renew_ms: int = Field(
        default=DEFAULT_RENEW_MS,
        ge=100,
        description="every this long the process renews the leases of all the tickets it holds, "
        "in one Redis call (at most lease_ms / 3)",
    )
    max_hold_ms: int = Field(
        default=DEFAULT_MAX_HOLD_MS,
        ge=1000,
        description="a ticket this process has held this long is taken for a lost release "
        "(logged, no longer renewed): keep it above the longest request, streams included",
    )
    queue_lease_ms: int = Field(
        default=3000, ge=100, description="a waiting ticket not refreshed for this long is gone"
    )
    retry_after_min_s: float = Field(default=1.0, gt=0)
    retry_after_max_s: float = Field(default=30.0, gt=0)
    retry_after_unknown_s: float = Field(default=5.0, gt=0)
    drain_ewma_alpha: float = Field(default=0.3, gt=0, le=1)
    redis_timeout_ms: int = Field(default=1000, ge=1)
    redis_retry_ms: int = Field(default=1000, ge=0)
    log_interval_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _band(self) -> AdmissionSettings:
        bad = {tier: ms for tier, ms in self.ttft_deadline_ms.items() if ms <= 0}
        if bad:
            raise ValueError(f"ttft_deadline_ms: every deadline must be > 0 ms, got {bad}")
        self.band()  # raises ValueError naming the bad bounds
        if self.queue_lease_ms <= 2 * self.poll_ms:
            raise ValueError("queue_lease_ms must exceed 2 x poll_ms")
        check_lease_settings(self.lease_ms, self.renew_ms, self.max_hold_ms)
        return self

    def band(self) -> RetryAfterBand:
        return RetryAfterBand(
            min_s=self.retry_after_min_s,
            max_s=self.retry_after_max_s,
            unknown_drain_s=self.retry_after_unknown_s,
        )

    def queue_limit(self, priority: int) -> int:
        return min(self.max_queue, self.priority_max_queue.get(priority, self.max_queue))

    def flow_limit(self, own: int | None = None) -> int | None:
        """The places a flow may hold in a model's queue: ``flow_max_queue`` and the key's own
        ``own`` bound, the lower (None: no bound of its own)."""
        bounds = [b for b in (self.flow_max_queue, own) if b is not None]
        return min(bounds) if bounds else None

    def own_flow_limit(self, own: int | None) -> bool:
        """Whether the key's own bound ``own`` is the one that holds (its overflow: 429)."""
        return own is not None and (self.flow_max_queue is None or own < self.flow_max_queue)
