"""The figures of ``triage bench compare``: ratios against the others and the oracle, the
targets, the compact results committed under ``loadtests/results/``."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loadtests.bench_settings import (
    BACK_TO_BACK,
    OURS,
    REFERENCE_ORACLE_85,
)
from loadtests.measure import (
    histogram_quantile,
    percentile,
    ratio,
)
from loadtests.report import fmt_s


def decision_figures(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    diff = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in after}
    total = diff.get(math.inf, 0.0)
    within = diff.get(0.005, float("nan"))
    return {
        "decisions": total,
        "p50_ms": 1000 * histogram_quantile(diff, 0.50),
        "p99_ms": 1000 * histogram_quantile(diff, 0.99),
        "share_within_5ms": within / total if total else float("nan"),
    }


RATIO_METRICS = ("p95_s", "p99_s", "ttft_p95_s", "goodput_rps", "shed_share")


def ratios(
    strategies: dict[str, dict[str, Any]], oracle: dict[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """``{"triage/<other>": {metric: ours / theirs}}`` for every other strategy (and the
    oracle, latency metrics only)."""
    out: dict[str, dict[str, float]] = {}
    ours = strategies.get(OURS)
    if ours is None:
        return out
    for name, theirs in strategies.items():
        if name != OURS:
            out[f"{OURS}/{name}"] = {m: ratio(ours[m], theirs[m]) for m in RATIO_METRICS}
    if oracle is not None:
        out[f"{OURS}/oracle"] = {m: ratio(ours[m], oracle[m]) for m in ("p95_s", "p99_s")}
    return out


def targets(doc: dict[str, Any]) -> list[str]:
    """The issue's targets, checked against this run (benchmarks: reported, never asserted)."""
    lines: list[str] = []
    levels = {lv["load"]: lv for lv in doc["levels"]}

    def verdict(ok: bool) -> str:
        return "MET " if ok else "MISS"

    at85 = levels.get(0.85)
    if at85 and OURS in at85["strategies"]:
        ours, oracle = at85["strategies"][OURS], at85["oracle"]
        lines.append(
            f"  {verdict(ours['p95_s'] <= 1.1 * oracle['p95_s'])} 85 %: triage p95 "
            f"{ours['p95_s']:.2f} s <= 1.1 x oracle p95 {oracle['p95_s']:.2f} s (replayed; the "
            f"reference's oracle {REFERENCE_ORACLE_85[0]:.2f} s x time scale "
            f"{doc['settings']['time_scale']:g} = "
            f"{REFERENCE_ORACLE_85[0] * doc['settings']['time_scale']:.2f} s)"
        )
        lb = at85["strategies"].get("least-busy")
        if lb:
            lines.append(
                f"  {verdict(ours['p99_s'] <= 0.8 * lb['p99_s'])} 85 %: triage p99 "
                f"{ours['p99_s']:.2f} s <= 0.8 x least-busy p99 {lb['p99_s']:.2f} s"
            )
    overhead = doc.get("overhead") or {}
    if "plugins_added_p50_ms" in overhead:
        added = overhead["plugins_added_p50_ms"]
        mode = overhead.get("modes", [BACK_TO_BACK])[0]
        line = (
            f"  {verdict(added <= 1.0)} the plugins add {added:+.1f} ms p50 to the proxy's own "
            f"overhead (triage {overhead[OURS]['overhead_p50_ms']:.1f} ms vs simple-shuffle "
            f"{overhead['simple-shuffle']['overhead_p50_ms']:.1f} ms, {mode}"
        )
        if "plugins_added_back_to_back_p50_ms" in overhead:
            line += f"; back to back {overhead['plugins_added_back_to_back_p50_ms']:+.1f} ms"
        lines.append(line + ")")
    over = [lv for load, lv in levels.items() if load >= 1.5]
    for lv in over:
        ours = lv["strategies"].get(OURS)
        if not ours:
            continue
        within = ours.get("answered_within_bound_share", float("nan"))
        lines.append(
            f"  {verdict(within >= 1.0 and ours['lost'] == 0)} {100 * lv['load']:.0f} %: "
            f"{100 * within:.1f} % of requests answered within max_wait + service "
            f"({lv['answer_bound_s']:.2f} s), {ours['lost']} lost, 503 share "
            f"{100 * ours['shed_share']:.1f} % ({ours['shed_with_retry_after']} of "
            f"{ours['shed']} 503s with Retry-After)"
        )
        for name, theirs in lv["strategies"].items():
            if name != OURS:
                share = theirs.get("answered_within_bound_share", float("nan"))
                lines.append(
                    f"        {name}: {100 * share:.1f} % within that bound, p99 "
                    f"{fmt_s(theirs['p99_s'])} s (it queues without bound)"
                )
        shed = ours.get("shed_decision") or {}
        if shed.get("decisions"):
            lines.append(
                f"  {verdict(shed['p99_ms'] <= 5.0)} {100 * lv['load']:.0f} %: shed decisions "
                f"(503 at arrival) p99 {shed['p99_ms']:.1f} ms at the proxy, p50 "
                f"{shed['p50_ms']:.2f} ms, {100 * shed['share_within_5ms']:.1f} % within 5 ms "
                f"({shed['decisions']:.0f} sheds at arrival; proxy histogram)"
            )
            memo = shed.get("memo") or {}
            if memo.get("decisions"):
                lines.append(
                    f"        {memo['decisions']:.0f} of them from the proxy's memo (no Redis "
                    f"round trip): p99 {memo['p99_ms']:.2f} ms; the rest asked Redis"
                )
        decision = ours.get("admission_decision") or {}
        if decision.get("decisions"):
            lines.append(
                f"        all first decisions (admit/queue/shed): p99 {decision['p99_ms']:.1f} "
                f"ms, {100 * decision['share_within_5ms']:.1f} % within 5 ms "
                f"({decision['decisions']:.0f} decisions)"
            )
            lag = ours.get("event_loop_lag") or {}
            if lag.get("decisions"):
                lines.append(
                    f"        the proxy's event loop itself, meanwhile: a 50 ms timer ran "
                    f"late by p50 {lag['p50_ms']:.1f} ms, p99 {lag['p99_ms']:.1f} ms "
                    f"({100 * (1 - lag['share_within_5ms']):.1f} % of ticks > 5 ms late: "
                    "LiteLLM's own work holding the loop)"
                )
    return lines


def compact_results(doc: dict[str, Any]) -> dict[str, Any]:
    """The committed form (``loadtests/results/``): per load level, per strategy, the figures the
    table shows, under stable keys (``p50_s``, ``p95_s``, ``p99_s``, ``ttft_p95_s``, ...)."""
    keys = (
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
        "proxy_cores_max_process",
        "admission_decision",
        "shed_decision",
        "event_loop_lag",
    )
    s = doc["settings"]
    loads: dict[str, Any] = {}
    for lv in doc["levels"]:
        entry = {
            name: {k: v[k] for k in keys if k in v}
            for name, v in [*lv["strategies"].items(), ("oracle", lv["oracle"])]
        }
        entry["ratios"] = lv["ratios"]
        loads[f"{lv['load']:g}"] = entry
    return {
        "meta": {
            "what": "triage bench: LiteLLM simple-shuffle and least-busy (Redis) vs the triage "
            "plugins, same fleet, same recorded Poisson arrivals per load level",
            "date": doc["date"],
            "replicas": s["replicas"],
            "speeds": s["speeds"],
            "max_active": s["max_active"],
            "time_scale": s["time_scale"],
            "service_s_at_speed_1": doc["service_s_at_speed_1"],
            "capacity_rps": doc["capacity_rps"],
            "output_tokens": s["output_tokens"],
            "stream_fraction": s["stream_fraction"],
            "seconds": s["seconds"],
            "proxies_per_strategy": s["proxies"],
            "cpu_count": doc["cpu_count"],
            "machine_busy_cores_before": doc["machine_busy_cores_before"],
            "oracle": "replayed exactly on the same arrivals (loadtests/oracle.py)",
        },
        "overhead": doc.get("overhead"),
        "loads": loads,
    }


def summary_us(samples_ns: Sequence[int], wall_ns: int | None = None) -> dict[str, float]:
    """n, p50/p99/max/mean in µs (and per second when ``wall_ns`` is the run's wall time)."""
    us = [v / 1000.0 for v in samples_ns]
    out = {
        "n": float(len(us)),
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "max_us": max(us, default=float("nan")),
        "mean_us": statistics.fmean(us) if us else float("nan"),
    }
    if wall_ns is not None:
        out["per_s"] = len(us) / (wall_ns / 1e9) if wall_ns > 0 else float("nan")
    return out


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


def summarize_windows(windows: Sequence[Window], replica_ids: Sequence[str]) -> dict[str, Any]:
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
    return {
        "windows": len(windows),
        "seconds": seconds,
        "requests": len(started),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "rps": rps,
        "p50_ms": percentile(latency_ms, 50),
        "p95_ms": percentile(latency_ms, 95),
        "p99_ms": percentile(latency_ms, 99),
        "max_ms": max(latency_ms, default=float("nan")),
        "share": {rid: picks.get(rid, 0) / len(ok) if ok else 0.0 for rid in replica_ids},
        "unknown_replica": sum(n for rid, n in picks.items() if rid not in replica_ids),
        "cpu_cores": cpu,
        "proxy_cpu_ms_per_request": 1000 * cpu["proxies"] / rps if rps else float("nan"),
        "reservations_left": {rid: n for rid, n in left.items() if n},
    }
