"""The settings of ``triage bench``: the fleet's, which every kind shares (``FleetSettings``; each
kind's own model adds to them under its own env prefix: ``TRIAGE_BENCH_`` for ``compare``,
``TRIAGE_BENCH_DECISIONS_``, ``TRIAGE_BENCH_BURST_``), the strategies compared, and
``compare``'s own (``BenchSettings``) with the reference run it scales."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.speeds import check_speeds
from devstack.stack_settings import StackSettings
from devstack.triton_launcher import StandinSettings
from loadtests.traffic import (
    LengthDist,
    StandinTiming,
)
from loadtests.workloads import WorkloadSettings

Strategy = Literal["simple-shuffle", "least-busy", "triage"]
OURS: Strategy = "triage"
CompareStrategy = Literal["simple-shuffle", "least-busy", "triage", "triage-no-affinity"]
"""What ``triage bench compare`` compares: LiteLLM's strategies, triage, and triage with its
prefix affinity off (``TRIAGE_ROUTING_PREFIX_AFFINITY=false``: load and size only)."""
TRIAGE_KINDS = ("triage", "triage-no-affinity")
KV_TOKENS_PER_BLOCK: int = StandinSettings.model_fields["kv_tokens_per_block"].default
"""The stand-in's KV block (the bench keeps its default)."""


class FleetSettings(BaseSettings):
    """The stand-in fleet a benchmark starts (``devstack.stack``). A subclass sets its env
    prefix, and its own defaults where its measurement needs them (with the reason)."""

    replicas: int = Field(default=3, ge=1, le=8, description="Triton stand-in replicas")
    speeds: list[float] = Field(
        default=[1.0, 1.0, 0.5], description="speed per replica, e.g. [1,1,0.5]"
    )
    max_active: int = Field(default=4, ge=1, le=64, description="batch slots per replica")
    poll_interval_ms: int = Field(default=250, ge=20, description="sidecar poll period")
    num_retries: int = Field(default=2, ge=0, description="router retries on another replica")
    workdir: Path | None = Field(default=None, description="stack logs; default a temp dir")

    @field_validator("speeds")
    @classmethod
    def _speeds(cls, speeds: list[float], info: ValidationInfo) -> list[float]:
        return check_speeds(speeds, info.data.get("replicas", 3))

    def stack_settings(self, **specific: Any) -> StackSettings:
        """The stack of this fleet; ``specific``: the kind's own stack settings."""
        return StackSettings(
            replicas=self.replicas,
            speeds=self.speeds,
            max_active=self.max_active,
            poll_interval_ms=self.poll_interval_ms,
            num_retries=self.num_retries,
            workdir=self.workdir,
            catalogue=[],  # no cold models: the bench measures routing on the one model
            **specific,
        )


S = TypeVar("S", bound=str)


def check_strategies(strategies: list[S]) -> list[S]:
    if not strategies or len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must be distinct and non-empty: {strategies}")
    return strategies


REFERENCE_DECODE_MS = 20.0  # 25 tokens x 20 ms = the reference's 0.5 s per request at speed 1

IDLE, BACK_TO_BACK = "idle", "back-to-back"  # the overhead's two kinds of rounds
REFERENCE_ORACLE_85 = (1.00, 1.23)  # p95, p99 s: the reference's simulated speed-aware oracle


class BenchSettings(FleetSettings, WorkloadSettings):
    """Settings of ``triage bench compare``: flags (``--seconds 20``) or ``TRIAGE_BENCH_*``."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_BENCH_",
        cli_kebab_case=True,
        cli_prog_name="triage bench compare",
        extra="forbid",
    )

    time_scale: float = Field(
        default=4.0,
        gt=0,
        le=100,
        description="stand-in time per token = 20 ms x this (1 = the reference's 0.5 s/request)",
    )
    output_tokens: str = Field(default="fixed:25", description="max_tokens distribution")
    prompt_tokens: str = Field(default="uniform:16,64", description="prompt length distribution")
    stream_fraction: float = Field(default=0.5, ge=0, le=1, description="share of streams")
    loads: list[float] = Field(
        default=[0.5, 0.85, 1.5], description="offered fractions of capacity"
    )
    seconds: float = Field(default=35.0, gt=0, description="arrival window per run")
    seed: int = Field(default=7, description="arrival sequence seed (level k uses seed + k)")
    proxies: int = Field(default=1, ge=1, le=8, description="proxy processes per strategy")
    strategies: list[CompareStrategy] = Field(
        default=["simple-shuffle", "least-busy", "triage"], description="what to compare"
    )
    prefill_ms_per_token: float | None = Field(
        default=None,
        ge=0,
        description="stand-in prefill per prompt token at time scale 1 (x time scale); default "
        "0.2 where prompts share prefixes (the stand-in's default), else 0 (the reference's)",
    )
    kv_cache_blocks: int | None = Field(
        default=None,
        ge=8,
        description="KV-cache blocks (64 tokens) per replica; default 96 where prompts share "
        "prefixes (a replica holds about a third of 12 tenants' 1,024-token prompts), else 512",
    )
    engine_queue_size: int = Field(
        default=4096, ge=0, description="stand-in engine queue: large, the fleet never sheds"
    )
    admission: dict[str, str] = Field(
        default={},
        description="admission settings of the triage proxies (TRIAGE_ADMISSION_<NAME>), e.g. "
        '{"max_wait_ms": "5000", "queue_allowance": "0"}; default the plugin\'s defaults',
    )
    overhead_requests: int = Field(
        default=200, ge=0, description="idle sequential requests per target for the overhead"
    )
    overhead_gap_ms: float = Field(
        default=50.0,
        ge=0,
        description="pause before each idle request, so the proxy has finished the previous "
        "one's background work (logging); every other round is sent back to back instead",
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="client timeout")
    idle_timeout_s: float = Field(default=600.0, gt=0, description="wait for the fleet to drain")
    pause_s: float = Field(default=2.0, ge=0, description="idle time before each run")
    arrivals_dir: Path | None = Field(
        default=None, description="replay arrivals-<load>.json recorded here before"
    )
    out_dir: Path = Field(
        default=Path("run/bench"), description="JSON, arrivals and PNG plots (run/ is ignored)"
    )
    results: Path | None = Field(
        default=None, description="also write the compact results here (loadtests/results/)"
    )

    @field_validator("loads")
    @classmethod
    def _loads(cls, loads: list[float]) -> list[float]:
        if not loads or any(not (math.isfinite(x) and 0 < x <= 10) for x in loads):
            raise ValueError("loads: one or more fractions of capacity in (0, 10]")
        return loads

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, strategies: list[CompareStrategy]) -> list[CompareStrategy]:
        return check_strategies(strategies)

    @field_validator("admission", mode="before")
    @classmethod
    def _admission(cls, value: Any) -> Any:
        from plugins.admission.settings import AdmissionSettings

        if isinstance(value, dict):
            value = {str(k).lower(): str(v) for k, v in value.items()}
            unknown = set(value) - set(AdmissionSettings.model_fields) | (
                set(value) & {"redis_url", "key_prefix"}
            )
            if unknown:
                raise ValueError(f"not admission settings (or set by the bench): {sorted(unknown)}")
            AdmissionSettings(redis_url="redis://127.0.0.1:6379/0", **value)  # type: ignore[arg-type]
        return value

    @property
    def max_wait_s(self) -> float:
        from plugins.admission.settings import AdmissionSettings

        default = AdmissionSettings.model_fields["max_wait_ms"].default
        return float(self.admission.get("max_wait_ms", default)) / 1000

    @field_validator("output_tokens", "prompt_tokens")
    @classmethod
    def _dist(cls, spec: str) -> str:
        return str(LengthDist.parse(spec))

    @property
    def decode_ms_per_token(self) -> float:
        return REFERENCE_DECODE_MS * self.time_scale

    @property
    def standin_prefill_ms_per_token(self) -> float:
        """The stand-in's prefill per prompt token (at this time scale)."""
        if self.prefill_ms_per_token is not None:
            return self.prefill_ms_per_token * self.time_scale
        return (0.2 if self.workload != "independent" else 0.0) * self.time_scale

    @property
    def standin_kv_cache_blocks(self) -> int:
        if self.kv_cache_blocks is not None:
            return self.kv_cache_blocks
        return 96 if self.workload != "independent" else 512

    def timing(self) -> StandinTiming:
        return StandinTiming(
            max_active=self.max_active,
            decode_ms_per_token=self.decode_ms_per_token,
            batch_slowdown=0.0,
            prefill_ms_per_token=self.standin_prefill_ms_per_token,
        )

    def capacity_rps(self) -> float:
        """Completions per second of the fleet kept full, every shared prefix cached: only each
        request's own message is prefilled (the capacity a cache-aware router can reach)."""
        output = LengthDist.parse(self.output_tokens).mean()
        own = (
            LengthDist.parse(self.prompt_tokens).mean() if self.standin_prefill_ms_per_token else 0
        )
        return self.timing().fleet_rps(self.speeds, output, own)

    def service_s(self, speed: float = 1.0) -> float:
        return self.timing().service_s(LengthDist.parse(self.output_tokens).mean(), 0.0, speed)

    def stack_settings(self, **specific: Any) -> StackSettings:
        return super().stack_settings(
            engine_queue_size=self.engine_queue_size,
            decode_ms_per_token=self.decode_ms_per_token,
            batch_slowdown=0.0,
            prefill_ms_per_token=self.standin_prefill_ms_per_token,
            kv_cache_blocks=self.standin_kv_cache_blocks,
            proxies=0,
            **specific,
        )


class DecisionSettings(FleetSettings):
    """Settings of ``triage bench decisions``: flags (``--max-tokens 16``) or
    ``TRIAGE_BENCH_DECISIONS_*``."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_BENCH_DECISIONS_",
        cli_kebab_case=True,
        cli_prog_name="triage bench decisions",
        cli_shortcuts={"json-path": "json"},
        extra="forbid",
    )

    # equal replicas by default: this bench measures the decision and the proxy's cost, not
    # the skew (``triage bench compare`` does)
    speeds: list[float] = Field(
        default_factory=list, description="speed per replica, e.g. 1,1,0.5; default all 1.0"
    )
    # a fresher snapshot than the stack's default: the closed loop reads it every few ms
    poll_interval_ms: int = Field(default=100, ge=20, description="sidecar poll period")
    clients: int = Field(default=16, ge=1, le=1024, description="closed-loop OpenAI clients")
    seconds: float = Field(default=15.0, gt=0, description="measured window per strategy")
    warmup_s: float = Field(default=2.0, ge=0, description="unmeasured load before the window")
    pause_s: float = Field(default=1.0, ge=0, description="idle time before each run")
    rounds: int = Field(default=1, ge=1, le=20, description="passes over the strategies")
    max_tokens: int = Field(default=16, ge=1, le=4096, description="tokens per completion")
    strategies: list[Strategy] = Field(
        default_factory=lambda: ["triage", "simple-shuffle", "least-busy"],
        description="proxies to load, in this order",
    )
    decisions: int = Field(default=5000, ge=100, description="decisions per in-process variant")
    concurrency: int = Field(default=64, ge=1, le=4096, description="coroutines, concurrent run")
    engine_queue_size: int = Field(default=16, ge=0, description="engine queue per replica")
    decode_ms_per_token: float = Field(
        default=10.0, gt=0, description="stand-in ms per token at speed 1"
    )
    request_timeout_s: float = Field(default=60.0, gt=0, description="client timeout")
    json_path: Path | None = Field(default=None, description="write the figures here (JSON)")

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, strategies: list[Strategy]) -> list[Strategy]:
        return check_strategies(strategies)

    def stack_settings(self, **specific: Any) -> StackSettings:
        return super().stack_settings(
            engine_queue_size=self.engine_queue_size,
            decode_ms_per_token=self.decode_ms_per_token,
            proxies=1,
            routing="triage",
            **specific,
        )
