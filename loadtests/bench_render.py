"""Text of ``triage bench compare``: one load level, the overhead, whether the proxy was the
bottleneck."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from devstack.stack import Stack
from loadtests.bench_results import BenchRun, LatencyUs, Level, LoadFigures, Overhead
from loadtests.bench_settings import IDLE, DecisionSettings
from loadtests.measure import (
    REST,
    STOLEN,
    fmt_ratio,
)
from loadtests.measure import (
    ratio as ratio_of,
)
from loadtests.report import Summary, fmt_s


def render_level(level: Level, replica_ids: Sequence[str]) -> str:
    lines = [
        f"\nload {100 * level.load:.0f} % of capacity: {level.offered_rps:.2f} req/s offered, "
        f"{level.requests} requests (Poisson, seed {level.seed}), the same sequence for "
        f"each; run order {', '.join(level.order)}",
    ]
    share_cols = "".join(f"{rid:>10}" for rid in replica_ids)
    lines.append(
        f"  {'strategy':<19}{'p50 s':>7}{'p95 s':>7}{'p99 s':>7}{'TTFT95':>8}{'good r/s':>9}"
        f"{'503 %':>7}{'lost':>5}{'cached':>7}{share_cols}{'proxy CPU':>10}"
    )
    rows: list[tuple[str, Summary, float | None]] = [
        (name, r.summary, r.cpu_cores.get("proxies")) for name, r in level.runs.items()
    ]
    if level.oracle is not None:
        rows.append((f"oracle ({level.oracle_kind}, replayed)", level.oracle, None))
    for name, s, cpu in rows:
        shares = "".join(f"{100 * s.share.get(rid, 0.0):>9.1f}%" for rid in replica_ids)
        lines.append(
            f"  {name:<19}{fmt_s(s.p50_s):>7}{fmt_s(s.p95_s):>7}{fmt_s(s.p99_s):>7}"
            f"{fmt_s(s.ttft_p95_s):>8}{fmt_s(s.goodput_rps):>9}"
            f"{100 * s.shed_share:>7.1f}{s.lost:>5}"
            f"{'-' if s.cached_share is None else f'{100 * s.cached_share:.0f}%':>7}{shares}"
            f"{(fmt_s(cpu) + ' c') if cpu is not None else '-':>10}"
        )
    for pair, values in level.ratios.items():
        cells = "  ".join(
            f"{m.removesuffix('_s').replace('_', ' ')} {fmt_ratio(v)}" for m, v in values.items()
        )
        lines.append(f"  ratio {pair:<26}{cells}")
    return "\n".join(lines)


def render_overhead(overhead: Overhead) -> str:
    direct = ", ".join(f"{rid} {ms:.0f} ms" for rid, ms in overhead.direct_p50_ms.items())
    modes = overhead.modes
    spacing = (
        f"half of them {overhead.gap_ms:g} ms apart (idle), half back to back"
        if IDLE in modes
        else "back to back"
    )
    lines = [
        f"\nproxy overhead ({overhead.requests} sequential requests per target, {spacing}, "
        f"max_tokens 1; latency minus the serving replica's direct p50: {direct})"
    ]
    for name, f in overhead.proxies.items():
        cells = "   ".join(
            f"{mode.replace('-', ' ')} p50 {m.p50_ms:6.1f} ms  p95 {m.p95_ms:6.1f} ms"
            for mode, m in f.by_mode.items()
        )
        lines.append(f"  {name:<16} {cells}   proxy CPU {f.cpu_ms_per_request:5.1f} ms/request")
    if overhead.plugins_added:
        cells = ", ".join(
            f"{p.p50_ms:+.1f} ms {'at p50 ' if i == 0 else ''}{mode.replace('-', ' ')} "
            f"(± {p.se_ms:.1f} ms{' standard error' if i == 0 else ''})"
            for i, (mode, p) in enumerate(overhead.plugins_added.items())
        )
        cpu = overhead.plugins_added_cpu_ms
        lines.append(
            f"  the plugins (triage vs simple-shuffle, paired per round): {cells}; "
            f"{cpu if cpu is not None else float('nan'):+.1f} ms proxy CPU per request"
        )
    return "\n".join(lines)


def bottleneck_lines(run: BenchRun) -> list[str]:
    runs = [
        (f"{name} at {100 * lv.load:.0f} %", r) for lv in run.levels for name, r in lv.runs.items()
    ]
    if not runs:
        return []
    proxy_run, proxy = max(runs, key=lambda r: r[1].proxy_cores_max_process)
    lag_run, lag = max(runs, key=lambda r: r[1].client_lag_p99_ms)
    worst_proxy, worst_lag = proxy.proxy_cores_max_process, lag.client_lag_p99_ms
    worst_rest = max(r.cpu_cores[REST] for _, r in runs)
    stolen_run, stolen = max(runs, key=lambda r: r[1].cpu_cores.get(STOLEN, 0.0))
    worst_stolen = stolen.cpu_cores.get(STOLEN, 0.0)
    worst_machine = max(r.cpu_cores["machine busy"] for _, r in runs)
    typical = sorted(r.proxy_cores_max_process for _, r in runs)[len(runs) // 2]
    lines = [
        f"  proxy process CPU: median run {typical:.2f} cores, busiest {worst_proxy:.2f} cores "
        f"({proxy_run}); one LiteLLM process runs one event loop: near 1.0 it is the bottleneck",
        f"  client: requests left at most {worst_lag:.1f} ms late (p99, {lag_run})",
        f"  machine: up to {worst_machine:.2f} of {run.cpu_count} cores busy in a run; "
        f"outside this benchmark up to {worst_rest:.2f} cores (other work on the machine); "
        f"stolen by the hypervisor up to {worst_stolen:.2f} cores ({stolen_run})",
    ]
    if worst_stolen > 0.1:
        lines.append(
            f"  => WARNING: the host took up to {worst_stolen:.2f} cores from this virtual "
            "machine during a run: its latencies are slower and noisier than the code's"
        )
    if worst_proxy < 0.6 and worst_lag < 50:
        lines.append("  => the proxies and the client had headroom: the replicas set the pace")
    else:
        lines.append(
            f"  => WARNING: near saturation in {proxy_run if worst_proxy >= 0.6 else lag_run}; "
            "the other runs had headroom (raise --time-scale to give every run some)"
        )
    if worst_rest > 0.3:
        lines.append(
            f"  => WARNING: {worst_rest:.2f} cores went to other processes: figures disturbed"
        )
    return lines


def ratio(a: float, b: float) -> str:
    return fmt_ratio(ratio_of(a, b))


def print_decisions(results: dict[str, LatencyUs], settings: DecisionSettings) -> None:
    print(
        f"\n1. Routing decision time, in this process, against the stack's Redis "
        f"({settings.replicas} real replica ids, {settings.decisions} decisions per row)"
    )
    width = max(len(k) for k in results) + 2
    print(f"  {'what':<{width}}{'p50 µs':>9}{'p99 µs':>9}{'max µs':>9}{'mean µs':>9}{'per s':>9}")

    def cell(value: float | None, digits: int = 1) -> str:
        if value is None:
            return ""
        return f"{'-':>9}" if math.isnan(value) else f"{value:>9.{digits}f}"

    for name, r in results.items():
        print(
            f"  {name:<{width}}{cell(r.p50_us)}{cell(r.p99_us)}{cell(r.max_us)}"
            f"{cell(r.mean_us)}{cell(r.per_s, 0)}"
        )
    pairs = [
        ("chooser alone", "triage choose_deployment, sequential", "simple_shuffle, sequential"),
        (
            "whole Router choice",
            "Router.async_get_available_deployment, triage",
            "Router.async_get_available_deployment, simple-shuffle",
        ),
    ]
    for label, mine, theirs in pairs:
        a, b = results.get(mine), results.get(theirs)
        if a and b:
            print(
                f"  ratio triage/simple_shuffle, {label}: p50 {ratio(a.p50_us, b.p50_us)}, "
                f"p99 {ratio(a.p99_us, b.p99_us)} (+{a.p50_us - b.p50_us:.0f} µs "
                "at p50)"
            )
    print(
        "  triage = one Redis round trip (EVALSHA pick.lua: read every replica, score, reserve):"
        " roughly the PING\n  baseline + the script's time inside Redis + redis-py's EVALSHA "
        "call; the release is a second round trip,\n  made by the proxy after the response. "
        "Concurrent: per-decision latency includes waiting for the\n  event loop; per s = "
        "pick+release pairs per second."
    )


def print_load(runs: dict[str, LoadFigures], stack: Stack, settings: DecisionSettings) -> None:
    ids = list(stack.replicas)
    speeds = ",".join(f"{s:g}" for s in stack.settings.speeds)
    rounds = f", {settings.rounds} rounds (odd ones reversed)" if settings.rounds > 1 else ""
    print(
        f"\n2. Proxy load: {settings.clients} closed-loop OpenAI-SDK clients x "
        f"{settings.seconds:g} s (+{settings.warmup_s:g} s warm-up) per strategy{rounds}, "
        f"max_tokens {settings.max_tokens}, no streaming;\n   {len(ids)} replicas, speeds "
        f"{speeds}, {settings.max_active} slots each, {settings.decode_ms_per_token:g} ms/token "
        "at speed 1; one proxy process per strategy, run one after another"
    )
    share_cols = "".join(f"{rid:>11}" for rid in ids)
    print(
        f"  {'routing':<16}{'req/s':>7}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'ok':>7}{'errors':>7}{share_cols}{'proxy CPU':>11}"
    )
    for name, r in runs.items():
        shares = "".join(f"{100 * r.share[rid]:>10.1f}%" for rid in ids)
        print(
            f"  {name:<16}{r.rps:>7.1f}{r.p50_ms:>8.0f}{r.p95_ms:>8.0f}"
            f"{r.p99_ms:>8.0f}{r.max_ms:>8.0f}{r.ok:>7}{r.errors:>7}{shares}"
            f"{r.proxy_cpu_ms_per_request:>8.1f} ms"
        )
    print("  (proxy CPU = CPU time of the proxy process per successful request)")
    base = runs.get("simple-shuffle")
    for name, r in runs.items():
        if base is not None and name != "simple-shuffle":
            print(
                f"  ratio {name}/simple-shuffle: req/s {ratio(r.rps, base.rps)}, "
                f"p99 {ratio(r.p99_ms, base.p99_ms)}"
            )
    for name, r in runs.items():
        if r.error_kinds:
            print(f"  errors of {name}: {r.error_kinds}")
        if r.unknown_replica:
            print(f"  {name}: {r.unknown_replica} successes without a known replica id")
        if r.reservations_left:
            print(f"  {name}: reservations left in Redis after its runs: {r.reservations_left}")
    roles = list(next(iter(runs.values())).cpu_cores)
    print(f"\n  CPU during the measured windows, in cores (this machine has {os.cpu_count()}):")
    print(f"  {'routing':<16}" + "".join(f"{role:>{max(len(role), 6) + 2}}" for role in roles))
    for name, r in runs.items():
        print(
            f"  {name:<16}"
            + "".join(f"{r.cpu_cores[role]:>{max(len(role), 6) + 2}.2f}" for role in roles)
        )
    worst = max(r.cpu_cores[REST] for r in runs.values())
    if worst > 0.15:
        print(
            f"  WARNING: up to {worst:.2f} cores went to processes outside this benchmark "
            "(rest of the machine): the figures are disturbed; rerun on a quiet machine."
        )
    print(
        f"  NOTE: {os.cpu_count()} cores are shared by the proxy, Triton, the sidecars, Redis "
        "and these clients: req/s is a\n  lower bound set by the proxy's CPU (one LiteLLM "
        "process), not by the replicas."
    )
