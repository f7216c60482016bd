"""The figures of ``triage bench compare``: ratios against the others and the oracle, the
targets, the compact results committed under ``loadtests/results/``."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtests.bench_settings import BACK_TO_BACK, OURS, REFERENCE_ORACLE_85, BenchSettings
from loadtests.measure import histogram_quantile, jsonable, percentile, ratio
from loadtests.report import Summary, fmt_s
from loadtests.traffic import LengthDist


@dataclass(slots=True, kw_only=True)
class DecisionFigures:
    """What one of the proxies' histograms counted during a run (its increase)."""

    decisions: float
    p50_ms: float
    p99_ms: float
    share_within_5ms: float
    memo: DecisionFigures | None = None
    """Shed decisions only: those answered from the proxy's memo (no Redis round trip)."""


def decision_figures(before: dict[float, float], after: dict[float, float]) -> DecisionFigures:
    diff = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in after}
    total = diff.get(math.inf, 0.0)
    within = diff.get(0.005, float("nan"))
    return DecisionFigures(
        decisions=total,
        p50_ms=1000 * histogram_quantile(diff, 0.50),
        p99_ms=1000 * histogram_quantile(diff, 0.99),
        share_within_5ms=within / total if total else float("nan"),
    )


@dataclass(slots=True, kw_only=True)
class StrategyRun:
    """One strategy's replay of one load level: the client's figures, the CPU, and (triage
    only) the proxies' own decision histograms."""

    summary: Summary
    cpu_cores: dict[str, float]
    """Cores per role during the arrival window (``measure.cpu_cores``)."""
    proxy_cores_max_process: float
    client_lag_p99_ms: float
    wall_s: float
    admission_decision: DecisionFigures | None = None
    shed_decision: DecisionFigures | None = None
    event_loop_lag: DecisionFigures | None = None
    litellm_redis_counts: dict[str, int | None] | None = None


@dataclass(slots=True, kw_only=True)
class Level:
    """One load level: every strategy on the same arrivals, the replayed oracle, the ratios."""

    load: float
    offered_rps: float
    requests: int
    seed: int
    order: list[str]
    answer_bound_s: float
    runs: dict[str, StrategyRun] = field(default_factory=dict)
    oracle: Summary | None = None
    oracle_kind: str = "ps"
    """Which replayed oracle had the lowest p95 (``bench_drive.replay_oracle_records``)."""
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class ModeOverhead:
    n: int
    p50_ms: float
    p95_ms: float


@dataclass(slots=True, kw_only=True)
class ProxyOverhead:
    by_mode: dict[str, ModeOverhead]
    cpu_ms_per_request: float


@dataclass(slots=True, kw_only=True)
class Paired:
    """The median of paired differences (ours minus simple-shuffle) and its standard error."""

    p50_ms: float
    se_ms: float


@dataclass(slots=True, kw_only=True)
class Overhead:
    """``measure_overhead``: each proxy's latency minus the serving replica's direct p50."""

    requests: int
    gap_ms: float
    modes: list[str]
    """The first is the one judged (idle when there is a gap)."""
    direct_p50_ms: dict[str, float]
    proxies: dict[str, ProxyOverhead]
    plugins_added: dict[str, Paired] = field(default_factory=dict)
    """By mode; empty unless both triage and simple-shuffle ran."""
    plugins_added_cpu_ms: float | None = None


@dataclass(slots=True, kw_only=True)
class BenchRun:
    """Everything ``triage bench compare`` measured (``bench.json``)."""

    settings: BenchSettings
    date: str
    cpu_count: int
    machine_busy_cores_before: float
    levels: list[Level] = field(default_factory=list)
    overhead: Overhead | None = None
    service_measured_s: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["settings"] = self.settings.model_dump(mode="json")
        return jsonable(out)


RATIO_METRICS = ("p95_s", "p99_s", "ttft_p95_s", "goodput_rps", "shed_share")


def ratios(
    strategies: Mapping[str, Summary], oracle: Summary | None = None
) -> dict[str, dict[str, float]]:
    """``{"triage/<other>": {metric: ours / theirs}}`` for every other strategy (and the
    oracle, latency metrics only)."""
    out: dict[str, dict[str, float]] = {}
    ours = strategies.get(OURS)
    if ours is None:
        return out
    for name, theirs in strategies.items():
        if name != OURS:
            out[f"{OURS}/{name}"] = {
                m: ratio(getattr(ours, m), getattr(theirs, m)) for m in RATIO_METRICS
            }
    if oracle is not None:
        out[f"{OURS}/oracle"] = {
            m: ratio(getattr(ours, m), getattr(oracle, m)) for m in ("p95_s", "p99_s")
        }
    return out


def verdict(ok: bool) -> str:
    return "MET " if ok else "MISS"


def workload_targets(run: BenchRun, at85: Level) -> list[str]:
    """Issue 17's targets at 85 %, for the run's workload (benchmarks, never asserted)."""
    runs, lines = at85.runs, []
    if OURS not in runs:
        return lines
    ours = runs[OURS].summary
    lb = runs["least-busy"].summary if "least-busy" in runs else None
    off = runs["triage-no-affinity"].summary if "triage-no-affinity" in runs else None
    workload = run.settings.workload
    if workload in ("shared-prefix", "multi-turn"):
        if lb is not None:
            lines.append(
                f"  {verdict(ours.ttft_p95_s <= 0.3 * lb.ttft_p95_s)} {workload}: triage TTFT "
                f"p95 {ours.ttft_p95_s:.2f} s <= 0.3 x least-busy {lb.ttft_p95_s:.2f} s"
            )
            lines.append(
                f"  {verdict(ours.goodput_rps >= 1.3 * lb.goodput_rps)} {workload}: triage "
                f"goodput {ours.goodput_rps:.2f} req/s >= 1.3 x least-busy {lb.goodput_rps:.2f}"
            )
        if off is not None:
            lines.append(
                f"  {verdict(ours.ttft_p95_s <= 0.5 * off.ttft_p95_s)} {workload}: triage TTFT "
                f"p95 {ours.ttft_p95_s:.2f} s <= 0.5 x without affinity {off.ttft_p95_s:.2f} s"
            )
    if workload == "hot-tenant" and off is not None:
        lines.append(
            f"  {verdict(ours.p99_s <= off.p99_s)} hot-tenant: triage p99 {ours.p99_s:.2f} s "
            f"<= without affinity {off.p99_s:.2f} s"
        )
    lengths = LengthDist.parse(run.settings.output_tokens)
    if workload == "independent" and lengths.kind != "fixed":
        if at85.oracle is not None:
            oracle = at85.oracle
            lines.append(
                f"  {verdict(ours.p95_s <= 1.15 * oracle.p95_s)} {lengths}: triage p95 "
                f"{ours.p95_s:.2f} s <= 1.15 x the size-aware oracle {oracle.p95_s:.2f} s "
                f"({at85.oracle_kind})"
            )
        if lb is not None:
            lines.append(
                f"  {verdict(ours.p95_s <= 0.6 * lb.p95_s)} {lengths}: triage p95 "
                f"{ours.p95_s:.2f} s <= 0.6 x least-busy {lb.p95_s:.2f} s"
            )
    if lb is not None:
        lines.append(
            f"  {verdict(ours.ttft_p95_s <= lb.ttft_p95_s)} {workload}: triage TTFT p95 "
            f"{ours.ttft_p95_s:.2f} s no worse than least-busy {lb.ttft_p95_s:.2f} s"
        )
    return lines


def targets(run: BenchRun) -> list[str]:
    """The issue's targets, checked against this run (benchmarks: reported, never asserted)."""
    lines: list[str] = []
    levels = {lv.load: lv for lv in run.levels}
    scale = run.settings.time_scale
    at85 = levels.get(0.85)
    if (
        at85
        and OURS in at85.runs
        and at85.oracle is not None
        and run.settings.workload == "independent"
    ):
        ours, oracle = at85.runs[OURS].summary, at85.oracle
        lines.append(
            f"  {verdict(ours.p95_s <= 1.1 * oracle.p95_s)} 85 %: triage p95 "
            f"{ours.p95_s:.2f} s <= 1.1 x oracle p95 {oracle.p95_s:.2f} s (replayed; the "
            f"reference's oracle {REFERENCE_ORACLE_85[0]:.2f} s x time scale {scale:g} = "
            f"{REFERENCE_ORACLE_85[0] * scale:.2f} s)"
        )
        if "least-busy" in at85.runs:
            lb = at85.runs["least-busy"].summary
            lines.append(
                f"  {verdict(ours.p99_s <= 0.8 * lb.p99_s)} 85 %: triage p99 "
                f"{ours.p99_s:.2f} s <= 0.8 x least-busy p99 {lb.p99_s:.2f} s"
            )
    overhead = run.overhead
    if overhead is not None and overhead.modes[0] in overhead.plugins_added:
        mode = overhead.modes[0]
        added = overhead.plugins_added[mode].p50_ms
        line = (
            f"  {verdict(added <= 1.0)} the plugins add {added:+.1f} ms p50 to the proxy's own "
            f"overhead (triage {overhead.proxies[OURS].by_mode[mode].p50_ms:.1f} ms vs "
            f"simple-shuffle {overhead.proxies['simple-shuffle'].by_mode[mode].p50_ms:.1f} ms, "
            f"{mode}"
        )
        if mode != BACK_TO_BACK and BACK_TO_BACK in overhead.plugins_added:
            line += f"; back to back {overhead.plugins_added[BACK_TO_BACK].p50_ms:+.1f} ms"
        lines.append(line + ")")
    for lv in (lv for load, lv in levels.items() if load >= 1.5):
        if OURS not in lv.runs:
            continue
        mine = lv.runs[OURS]
        ours = mine.summary
        within = ours.answered_within_bound_share
        within = float("nan") if within is None else within
        lines.append(
            f"  {verdict(within >= 1.0 and ours.lost == 0)} {100 * lv.load:.0f} %: "
            f"{100 * within:.1f} % of requests answered within max_wait + service "
            f"({lv.answer_bound_s:.2f} s), {ours.lost} lost, 503 share "
            f"{100 * ours.shed_share:.1f} % ({ours.shed_with_retry_after} of "
            f"{ours.shed} 503s with Retry-After)"
        )
        for name, theirs in lv.runs.items():
            if name != OURS:
                share = theirs.summary.answered_within_bound_share
                lines.append(
                    f"        {name}: {100 * (share if share is not None else float('nan')):.1f} "
                    f"% within that bound, p99 {fmt_s(theirs.summary.p99_s)} s (it queues "
                    "without bound)"
                )
        shed = mine.shed_decision
        if shed is not None and shed.decisions:
            lines.append(
                f"  {verdict(shed.p99_ms <= 5.0)} {100 * lv.load:.0f} %: shed decisions "
                f"(503 at arrival) p99 {shed.p99_ms:.1f} ms at the proxy, p50 "
                f"{shed.p50_ms:.2f} ms, {100 * shed.share_within_5ms:.1f} % within 5 ms "
                f"({shed.decisions:.0f} sheds at arrival; proxy histogram)"
            )
            if shed.memo is not None and shed.memo.decisions:
                lines.append(
                    f"        {shed.memo.decisions:.0f} of them from the proxy's memo (no "
                    f"Redis round trip): p99 {shed.memo.p99_ms:.2f} ms; the rest asked Redis"
                )
        decision, lag = mine.admission_decision, mine.event_loop_lag
        if decision is not None and decision.decisions:
            lines.append(
                f"        all first decisions (admit/queue/shed): p99 {decision.p99_ms:.1f} "
                f"ms, {100 * decision.share_within_5ms:.1f} % within 5 ms "
                f"({decision.decisions:.0f} decisions)"
            )
            if lag is not None and lag.decisions:
                lines.append(
                    f"        the proxy's event loop itself, meanwhile: a 50 ms timer ran "
                    f"late by p50 {lag.p50_ms:.1f} ms, p99 {lag.p99_ms:.1f} ms "
                    f"({100 * (1 - lag.share_within_5ms):.1f} % of ticks > 5 ms late: "
                    "LiteLLM's own work holding the loop)"
                )
    if at85 is not None:
        lines += workload_targets(run, at85)
    return lines


COMPACT_SUMMARY = (
    "p50_s",
    "p95_s",
    "p99_s",
    "ttft_p95_s",
    "goodput_rps",
    "goodput_tokens_per_s",
    "shed_share",
    "lost",
    "started",
    "ok",
    "errors",
    "share",
    "answered_within_bound_share",
)
COMPACT_RUN = ("proxy_cores_max_process", "admission_decision", "shed_decision", "event_loop_lag")


def compact_summary(summary: Summary, run: StrategyRun | None = None) -> dict[str, Any]:
    out = {k: getattr(summary, k) for k in COMPACT_SUMMARY}
    if run is not None:
        for k in COMPACT_RUN:
            value = getattr(run, k)
            if value is not None:
                out[k] = asdict(value) if isinstance(value, DecisionFigures) else value
    return {k: v for k, v in out.items() if v is not None}


def compact_results(run: BenchRun) -> dict[str, Any]:
    """The committed form (``loadtests/results/``): per load level, per strategy, the figures the
    table shows, under stable keys (``p50_s``, ``p95_s``, ``p99_s``, ``ttft_p95_s``, ...)."""
    s = run.settings
    loads: dict[str, Any] = {}
    for lv in run.levels:
        entry: dict[str, Any] = {name: compact_summary(r.summary, r) for name, r in lv.runs.items()}
        if lv.oracle is not None:
            entry["oracle"] = compact_summary(lv.oracle)
        entry["ratios"] = lv.ratios
        loads[f"{lv.load:g}"] = entry
    return jsonable(
        {
            "meta": {
                "what": "triage bench: LiteLLM simple-shuffle and least-busy (Redis) vs the "
                "triage plugins, same fleet, same recorded Poisson arrivals per load level",
                "date": run.date,
                "replicas": s.replicas,
                "speeds": s.speeds,
                "max_active": s.max_active,
                "time_scale": s.time_scale,
                "service_s_at_speed_1": s.service_s(1.0),
                "capacity_rps": s.capacity_rps(),
                "output_tokens": s.output_tokens,
                "stream_fraction": s.stream_fraction,
                "seconds": s.seconds,
                "proxies_per_strategy": s.proxies,
                "cpu_count": run.cpu_count,
                "machine_busy_cores_before": run.machine_busy_cores_before,
                "oracle": "replayed exactly on the same arrivals (loadtests/oracle.py)",
            },
            "overhead": None if run.overhead is None else asdict(run.overhead),
            "loads": loads,
        }
    )


@dataclass(slots=True, kw_only=True)
class LatencyUs:
    """A spread of timings in µs (and how many per second of the run's wall time)."""

    n: int
    p50_us: float
    p99_us: float
    max_us: float
    mean_us: float
    per_s: float | None = None


def summary_us(samples_ns: Sequence[int], wall_ns: int | None = None) -> LatencyUs:
    us = [v / 1000.0 for v in samples_ns]
    return LatencyUs(
        n=len(us),
        p50_us=percentile(us, 50),
        p99_us=percentile(us, 99),
        max_us=max(us, default=float("nan")),
        mean_us=statistics.fmean(us) if us else float("nan"),
        per_s=None
        if wall_ns is None
        else len(us) / (wall_ns / 1e9)
        if wall_ns > 0
        else float("nan"),
    )


@dataclass
class Sample:
    start_ns: int
    end_ns: int
    replica: str | None
    """The ``x-litellm-model-id`` of a success; None for an error."""
    error: str | None = None


@dataclass
class Window:
    """One measured run of one strategy: its samples, the window [w0, w1) and the CPU used."""

    samples: list[Sample]
    w0: int
    w1: int
    cpu_s: dict[str, float]
    """CPU seconds per role during the window (REST and "machine busy" included)."""
    reservations_left: dict[str, int]


@dataclass(slots=True, kw_only=True)
class LoadFigures:
    """One strategy's closed-loop windows (``summarize_windows``)."""

    windows: int
    seconds: float
    requests: int
    ok: int
    errors: int
    error_kinds: dict[str, int]
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    share: dict[str, float]
    unknown_replica: int
    cpu_cores: dict[str, float]
    proxy_cpu_ms_per_request: float
    reservations_left: dict[str, int]


def summarize_windows(windows: Sequence[Window], replica_ids: Sequence[str]) -> LoadFigures:
    """Over all windows of one strategy: req/s = successes that ended inside a window / the
    windows' length; latency, errors and shares over the requests that started inside one."""
    seconds = sum((w.w1 - w.w0) / 1e9 for w in windows)
    started = [s for w in windows for s in w.samples if w.w0 <= s.start_ns < w.w1]
    done = sum(
        1 for w in windows for s in w.samples if s.error is None and w.w0 <= s.end_ns <= w.w1
    )
    ok = [s for s in started if s.error is None]
    latency_ms = [(s.end_ns - s.start_ns) / 1e6 for s in ok]
    picks = Counter(s.replica for s in ok)
    errors = Counter(s.error for s in started if s.error is not None)
    cpu = {role: sum(w.cpu_s[role] for w in windows) / seconds for role in windows[0].cpu_s}
    left: Counter[str] = Counter()
    for w in windows:
        left.update(w.reservations_left)
    rps = done / seconds
    return LoadFigures(
        windows=len(windows),
        seconds=seconds,
        requests=len(started),
        ok=len(ok),
        errors=sum(errors.values()),
        error_kinds=dict(errors),
        rps=rps,
        p50_ms=percentile(latency_ms, 50),
        p95_ms=percentile(latency_ms, 95),
        p99_ms=percentile(latency_ms, 99),
        max_ms=max(latency_ms, default=float("nan")),
        share={rid: picks.get(rid, 0) / len(ok) if ok else 0.0 for rid in replica_ids},
        unknown_replica=sum(n for rid, n in picks.items() if rid not in replica_ids),
        cpu_cores=cpu,
        proxy_cpu_ms_per_request=1000 * cpu["proxies"] / rps if rps else float("nan"),
        reservations_left={rid: n for rid, n in left.items() if n},
    )
