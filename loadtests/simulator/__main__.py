"""Fleet simulator CLI: ``python -m loadtests.simulator [--replicas 200 --proxies 20 ...]``.

Every flag is also an environment variable ``TRIAGE_SIM_<NAME>``; ``--help`` lists them.
Invalid values stop it with exit code 2, naming the field.
"""

from __future__ import annotations

import math
import random
import re
import sys
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.settings_errors import settings_from_cli
from loadtests.simulator.engine import ProxyAssign, Scenario, ServiceSource, read_arrivals, run
from loadtests.simulator.model import Fleet, LengthDist, Workload
from loadtests.simulator.policies import ALIASES, DEFAULT_POLICIES, POLICIES, make_policy
from loadtests.simulator.report import plot, summarize, table, write_json
from plugins.routing.policy import PolicyParams

PROG = "python -m loadtests.simulator"
_MIX = re.compile(r"^\s*(?:fraction\s+)?([0-9./]+)\s*(?:@|\s+at\s+)\s*([0-9.eE+-]+)\s*$")


def parse_speeds(text: str, replicas: int, seed: int = 1) -> list[float]:
    """Speeds of ``replicas`` replicas from ``"1,1,0.5"`` (one per replica), ``"0.25@0.5"`` /
    ``"fraction 0.25 at 0.5"`` (that fraction of the fleet at that speed, the rest at 1.0; several
    classes separated by commas; placed in the list by a shuffle seeded with ``seed``), or ``""``
    (all 1.0)."""
    text = text.strip()
    if not text:
        return [1.0] * replicas
    parts = [p for p in text.split(",") if p.strip()]
    if any("@" in p or " at " in p for p in parts):
        speeds: list[float] = []
        for part in parts:
            match = _MIX.match(part)
            if not match:
                raise ValueError(f"cannot read {part.strip()!r}: want FRACTION@SPEED")
            fraction, speed = float(Fraction(match.group(1))), float(match.group(2))
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"fraction {fraction} not in [0, 1]")
            speeds += [speed] * round(fraction * replicas)
        if len(speeds) > replicas:
            raise ValueError(f"the fractions add up to more than {replicas} replicas")
        speeds += [1.0] * (replicas - len(speeds))
        random.Random(seed).shuffle(speeds)
    else:
        speeds = [float(p) for p in parts]
        if len(speeds) != replicas:
            raise ValueError(f"{len(speeds)} speeds for {replicas} replicas")
    if any(not (math.isfinite(s) and s > 0) for s in speeds):
        raise ValueError("every speed must be finite and > 0")
    return speeds


class SimSettings(BaseSettings):
    """Fleet simulator settings: flags (``--replicas 200``) or ``TRIAGE_SIM_*``."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_SIM_",
        cli_kebab_case=True,
        cli_prog_name=PROG,
        extra="forbid",
    )

    seed: int = Field(default=1, ge=0, description="seeds arrivals, lengths, proxies, ties")
    replicas: int = Field(default=3, ge=1, le=10_000, description="replicas in the fleet")
    speeds: str = Field(
        default="",
        description='per replica "1,1,0.5", or a mix "0.25@0.5" / "fraction 0.25 at 0.5" '
        "(that fraction at that speed, the rest 1.0); default all 1.0",
    )
    slots: list[int] = Field(default=[4], description="max_active: one value, or one per replica")
    service_s: float = Field(default=0.5, gt=0, description="mean decode time at speed 1 (s)")
    decode_ms_per_token: float = Field(default=20.0, gt=0, description="step time at speed 1")
    prefill_ms: float = Field(default=0.0, ge=0, description="per-request prefill at speed 1")
    groups: int = Field(default=0, ge=0, description="tenants sharing a system prompt (0: none)")
    hot_share: float = Field(
        default=0.0, ge=0, lt=1, description="share of requests from tenant 0 (0: even)"
    )
    prefix_tokens: int = Field(default=0, ge=0, description="tokens of each tenant's prefix")
    own_tokens: int = Field(default=0, ge=0, description="each request's own prompt tokens")
    prefill_ms_per_token: float = Field(
        default=0.0, ge=0, description="prefill per uncached prompt token at speed 1 (ms)"
    )
    cache_prefixes: int = Field(
        default=0, ge=0, description="tenants' prefixes each replica's KV cache holds (LRU)"
    )
    lengths: LengthDist = Field(default="fixed", description="request length distribution")
    lognormal_sigma: float = Field(default=1.0, gt=0, description="lognormal lengths' sigma")
    batch_slowdown: float = Field(
        default=0.0, ge=0, le=1, description="stand-in step slowdown per extra sequence"
    )
    queue_limit: int | None = Field(
        default=None, ge=0, description="waiting queue per replica; full = 503 (default none)"
    )
    kv_per_active: float = Field(
        default=0.0, ge=0, le=1, description="KV fraction per active sequence (0: off)"
    )
    load: float = Field(default=0.85, gt=0, le=2, description="arrival rate / fleet capacity")
    duration_s: float = Field(default=60.0, gt=0, description="arrival window (s)")
    requests: int | None = Field(default=None, ge=1, description="arrivals instead of duration")
    warmup_s: float = Field(default=5.0, ge=0, description="arrivals before this not measured")
    arrivals_file: Path | None = Field(
        default=None, description="JSON arrival times (s) instead of Poisson"
    )
    proxies: int = Field(default=1, ge=1, le=10_000, description="proxy processes")
    proxy_assign: ProxyAssign = Field(default="random", description="request -> proxy")
    poll_interval_ms: float = Field(default=250.0, gt=0, description="sidecar poll period")
    staleness_ms: float = Field(default=0.0, ge=0, description="extra age of what proxies read")
    service_source: ServiceSource = Field(
        default="measured",
        description="measured: the sidecar's StepTimeWindow; true: the true step time at once",
    )
    policies: list[str] = Field(
        default=list(DEFAULT_POLICIES), description="policies to run, in order"
    )
    tie_tolerance: float = Field(
        default=PolicyParams.tie_tolerance, ge=0, le=1, description="triage tie band"
    )
    stale_after_ms: int = Field(
        default=PolicyParams.stale_after_ms, ge=0, description="triage: older = unknown"
    )
    exact_triage: bool = Field(
        default=False, description="triage: choose() over the whole fleet on every pick"
    )
    out_dir: Path | None = Field(default=None, description="write results.json and PNGs here")
    plots: bool = Field(default=True, description="write PNG plots to --out-dir")

    @field_validator("speeds")
    @classmethod
    def _speeds(cls, speeds: str, info: ValidationInfo) -> str:
        parse_speeds(speeds, info.data.get("replicas", 3), info.data.get("seed", 1))
        return speeds

    @field_validator("slots")
    @classmethod
    def _slots(cls, slots: list[int], info: ValidationInfo) -> list[int]:
        replicas = info.data.get("replicas", 3)
        if len(slots) not in (1, replicas):
            raise ValueError(f"{len(slots)} values for {replicas} replicas (want 1 or one each)")
        if any(c < 1 for c in slots):
            raise ValueError("every slot count must be >= 1")
        return slots

    @field_validator("policies")
    @classmethod
    def _policies(cls, policies: list[str]) -> list[str]:
        names = [ALIASES.get(p, p) for p in policies]
        unknown = [p for p in names if p not in POLICIES]
        if unknown:
            raise ValueError(f"unknown {unknown}; known: {', '.join(sorted(POLICIES))}")
        if not names or len(set(names)) != len(names):
            raise ValueError(f"want distinct policies, got {policies}")
        return names

    @field_validator("arrivals_file")
    @classmethod
    def _arrivals(cls, path: Path | None) -> Path | None:
        if path is not None:
            read_arrivals(path)  # raises ValueError / OSError naming the file
        return path

    def fleet(self) -> Fleet:
        slots = self.slots * self.replicas if len(self.slots) == 1 else self.slots
        return Fleet(tuple(parse_speeds(self.speeds, self.replicas, self.seed)), tuple(slots))

    def workload(self) -> Workload:
        return Workload(
            service_s=self.service_s,
            decode_ms_per_token=self.decode_ms_per_token,
            prefill_ms=self.prefill_ms,
            lengths=self.lengths,
            sigma=self.lognormal_sigma,
            groups=self.groups,
            hot_share=self.hot_share,
            prefix_tokens=self.prefix_tokens,
            own_tokens=self.own_tokens,
            prefill_ms_per_token=self.prefill_ms_per_token,
        )

    def scenario(self) -> Scenario:
        return Scenario.build(
            self.fleet(),
            self.workload(),
            load=self.load,
            duration_s=self.duration_s,
            requests=self.requests,
            arrival_times=read_arrivals(self.arrivals_file) if self.arrivals_file else None,
            proxies=self.proxies,
            proxy_assign=self.proxy_assign,
            seed=self.seed,
            warmup_s=self.warmup_s,
            poll_interval_s=self.poll_interval_ms / 1000.0,
            staleness_s=self.staleness_ms / 1000.0,
            service_source=self.service_source,
            batch_slowdown=self.batch_slowdown,
            queue_limit=self.queue_limit,
            kv_per_active=self.kv_per_active,
            cache_prefixes=self.cache_prefixes,
        )

    def params(self) -> PolicyParams:
        return PolicyParams(
            tie_tolerance=self.tie_tolerance,
            stale_after_ms=self.stale_after_ms,
            prefill_ms_per_token=self.prefill_ms_per_token,  # as an operator sets it
        )


def simulate(
    settings: SimSettings, log: Any = None, scenario: Scenario | None = None
) -> tuple[Scenario, dict[str, dict[str, Any]]]:
    """Run every policy of ``settings`` on one scenario; the figures per policy."""
    scenario = scenario or settings.scenario()
    figures: dict[str, dict[str, Any]] = {}
    for name in settings.policies:
        policy = make_policy(name, settings.params(), settings.exact_triage)
        result = run(scenario, policy)
        figures[name] = summarize(result)
        if log is not None:
            log(
                f"  {name:<18} {result.wall_s:6.1f} s wall, {len(scenario.arrivals)} requests, "
                f"{result.events} events"
            )
    return scenario, figures


def describe(settings: SimSettings, scenario: Scenario) -> str:
    speeds = scenario.fleet.speeds
    prompts = ""
    if settings.groups:
        hot = f", tenant 0 {100 * settings.hot_share:g} %" if settings.hot_share else ""
        prompts = (
            f"; {settings.groups} tenants{hot}, prompts {settings.prefix_tokens} shared + "
            f"{settings.own_tokens} own tokens at {settings.prefill_ms_per_token:g} ms/token, "
            f"{settings.cache_prefixes} prefixes per KV cache"
        )
    mix = ", ".join(f"{speeds.count(s)} x speed {s:g}" for s in sorted(set(speeds)))
    return (
        f"{len(speeds)} replicas ({mix}), slots {settings.slots}, {settings.service_s:g} s "
        f"({settings.lengths}) at speed 1, capacity {scenario.capacity_rps:.1f} req/s, "
        f"{len(scenario.arrivals)} arrivals over {scenario.window_s:.1f} s "
        f"(load {settings.load:g}), {settings.proxies} proxies, polls "
        f"{settings.poll_interval_ms:g} ms, staleness {settings.staleness_ms:g} ms, service "
        f"{settings.service_source}, seed {settings.seed}{prompts}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_cli(SimSettings, sys.argv[1:] if argv is None else argv, PROG)
    if settings is None:
        return 2

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    began = time.perf_counter()
    scenario = settings.scenario()
    log(f"simulating {describe(settings, scenario)}")
    scenario, figures = simulate(settings, log, scenario)
    print(f"\nfleet simulator: {describe(settings, scenario)}\n")
    print(table(figures))
    print(f"total {time.perf_counter() - began:.0f} s wall")
    if settings.out_dir is not None:
        info = settings.model_dump(mode="json")
        info.update(
            capacity_rps=scenario.capacity_rps,
            arrivals=len(scenario.arrivals),
            window_s=scenario.window_s,
            fleet_speeds=list(scenario.fleet.speeds),
            command=" ".join([PROG, *(sys.argv[1:] if argv is None else argv)]),
        )
        write_json(settings.out_dir / "results.json", info, figures)
        written = [settings.out_dir / "results.json"]
        if settings.plots:
            written += plot(figures, scenario.fleet, settings.out_dir)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
