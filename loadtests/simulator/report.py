"""Figures of a run, the comparison table, ratios, JSON and PNG plots.

Per policy (requests arriving after the warm-up): p50/p95/p99 latency (arrival to last token),
p95 TTFT (arrival to first token = queue wait + prefill + first step), goodput (completions
that ended inside the arrival window, per second of the measured window; and tokens/s), the
503 share (requests a full replica queue rejected; 0 unless ``queue_limit`` is set), each
replica's share, and the ratios triage / other policy (below 1: triage is better).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.simulator.engine import RunResult
from loadtests.simulator.model import Fleet
from loadtests.simulator.policies import ORACLES


def summarize(result: RunResult, bins: int | None = None) -> dict[str, Any]:
    """The figures of one run (plain floats and lists, JSON-ready); ``bins`` of the latency
    over time (default: up to 60, at least ~200 requests each)."""
    sc = result.scenario
    arrivals = np.asarray(sc.arrivals)
    replica = np.asarray(result.replica_of)
    finish = np.asarray(result.finish)
    first = np.asarray(result.first)
    start = np.asarray(result.start)
    tokens = np.asarray(sc.tokens)
    measured = arrivals >= sc.warmup_s
    done = measured & (replica >= 0)
    latency = finish[done] - arrivals[done]
    ttft = first[done] - arrivals[done]
    wait = start[done] - arrivals[done]
    window = max(sc.window_s - sc.warmup_s, 1e-9)
    in_window = done & (finish <= sc.window_s)
    size = len(sc.fleet)
    counts = np.bincount(replica[done], minlength=size)
    total = int(measured.sum())
    share = (counts / max(int(done.sum()), 1)).tolist()
    speeds = np.asarray(sc.fleet.speeds)
    slots = np.asarray(sc.fleet.slots)
    by_speed: dict[str, dict[str, float]] = {}
    capacity = speeds * slots
    for speed in sorted(set(sc.fleet.speeds)):
        members = speeds == speed
        by_speed[f"{speed:g}"] = {
            "replicas": int(members.sum()),
            "share": float(counts[members].sum() / max(int(done.sum()), 1)),
            "capacity_share": float(capacity[members].sum() / capacity.sum()),
        }
    return {
        "policy": result.policy,
        "requests": total,
        "p50_s": _pct(latency, 50),
        "p95_s": _pct(latency, 95),
        "p99_s": _pct(latency, 99),
        "max_s": float(latency.max()) if latency.size else math.nan,
        "mean_s": float(latency.mean()) if latency.size else math.nan,
        "ttft_p95_s": _pct(ttft, 95),
        "wait_p95_s": _pct(wait, 95),
        "goodput_rps": float(in_window.sum() / window),
        "tokens_per_s": float(tokens[in_window].sum() / window),
        "rejected_share": float((measured & (replica < 0)).sum() / max(total, 1)),
        "cached_share": _cached_share(result, done),
        "share": share,
        "share_by_speed": by_speed,
        "share_max": float(max(share)),
        "share_min": float(min(share)),
        "p95_over_time": _over_time(
            arrivals[done],
            latency,
            sc.warmup_s,
            sc.window_s,
            bins or max(5, min(60, latency.size // 200)),
        ),
        "wall_s": result.wall_s,
        "events": result.events,
    }


def _cached_share(result: RunResult, done: np.ndarray) -> float:
    """Prompt tokens found cached / prompt tokens, over the measured admitted requests (nan
    when prompts are not modelled)."""
    prompt = result.scenario.workload.prompt_tokens
    if not prompt or not result.cached or not done.any():
        return math.nan
    return float(np.asarray(result.cached)[done].sum() / (prompt * int(done.sum())))


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def _over_time(
    arrivals: np.ndarray, latency: np.ndarray, begin: float, end: float, bins: int
) -> dict[str, list[float]]:
    """p95 latency per arrival-time bin (the x value is the bin's middle)."""
    edges = np.linspace(begin, max(end, begin + 1e-9), bins + 1)
    which = np.clip(np.searchsorted(edges, arrivals, side="right") - 1, 0, bins - 1)
    t: list[float] = []
    p95: list[float] = []
    for b in range(bins):
        chunk = latency[which == b]
        if chunk.size:
            t.append(float((edges[b] + edges[b + 1]) / 2))
            p95.append(float(np.percentile(chunk, 95)))
    return {"t_s": t, "p95_s": p95}


def best_oracle(figures: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The oracle variant of the run with the lowest p95 (then p99, then p50)."""
    present = [name for name in ORACLES if name in figures]
    if not present:
        return None
    return min(present, key=lambda n: tuple(figures[n][k] for k in ("p95_s", "p99_s", "p50_s")))


def ratios(
    figures: Mapping[str, Mapping[str, Any]], ours: str = "triage"
) -> dict[str, dict[str, float]]:
    """``ours`` / every other policy for p50, p95, p99, TTFT p95 and goodput; the key
    ``best-oracle`` repeats the ratios to ``best_oracle(figures)``."""
    if ours not in figures:
        return {}
    out: dict[str, dict[str, float]] = {}
    best = best_oracle(figures)
    names = [*figures, *(["best-oracle"] if best else [])]
    for name in names:
        if name == ours:
            continue
        theirs = figures[best if name == "best-oracle" else name]
        out[name] = {
            key: _ratio(figures[ours].get(key), theirs.get(key))
            for key in ("p50_s", "p95_s", "p99_s", "ttft_p95_s", "goodput_rps")
            if key in theirs
        }
    return out


def _ratio(a: Any, b: Any) -> float:
    try:
        return float(a) / float(b) if float(b) != 0 else math.nan
    except (TypeError, ValueError):
        return math.nan


def _fmt_s(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.0f}"


def share_text(fig: Mapping[str, Any]) -> str:
    """Per-replica share: every replica on a small fleet, by speed class on a large one."""
    share: list[float] = fig["share"]
    if len(share) <= 6:
        return " / ".join(f"{100 * s:.1f}" for s in share) + " %"
    parts = [
        f"x{speed}: {100 * c['share']:.1f} % (cap. {100 * c['capacity_share']:.1f} %)"
        for speed, c in fig["share_by_speed"].items()
    ]
    parts.append(f"max {100 * fig['share_max']:.2f} %")
    return ", ".join(parts)


def table(figures: Mapping[str, Mapping[str, Any]], ours: str = "triage") -> str:
    """The Markdown comparison table (the comparison runner's columns)."""
    rel = ratios(figures, ours)
    head = (
        "| policy | p50 s | p95 s | p99 s | TTFT p95 s | goodput req/s | tokens/s | 503 % "
        f"| cached % | {ours} p95 / p99 ratio | share per replica |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, fig in figures.items():
        r = rel.get(name)
        ratio = f"{r['p95_s']:.2f} / {r['p99_s']:.2f}" if r else "-"
        rows.append(
            f"| {name} | {_fmt_s(fig['p50_s'])} | {_fmt_s(fig['p95_s'])} | "
            f"{_fmt_s(fig['p99_s'])} | {_fmt_s(fig['ttft_p95_s'])} | "
            f"{fig['goodput_rps']:.1f} | {fig['tokens_per_s']:.0f} | "
            f"{100 * fig['rejected_share']:.1f} | {_fmt_pct(fig.get('cached_share'))} | "
            f"{ratio} | {share_text(fig)} |"
        )
    text = head + "\n".join(rows) + "\n"
    best = best_oracle(figures)
    if best and "best-oracle" in rel:
        r = rel["best-oracle"]
        text += (
            f"\n{ours} vs the best oracle ({best}): p95 {r['p95_s']:.2f}x, "
            f"p99 {r['p99_s']:.2f}x, p50 {r['p50_s']:.2f}x\n"
        )
    return text


def write_json(path: Path, scenario: Mapping[str, Any], figures: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"scenario": scenario, "policies": figures, "ratios": ratios(figures)}
    path.write_text(json.dumps(body, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def plot(figures: Mapping[str, Mapping[str, Any]], fleet: Fleet, out_dir: Path) -> list[Path]:
    """Two PNGs: p95 latency over time per policy; each replica's share per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, f in figures.items():
        series = f["p95_over_time"]
        ax.plot(series["t_s"], series["p95_s"], label=name, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("p95 latency per time bin (s)")
    ax.set_title("Latency over time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "latency_over_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    names = list(figures)
    rows = math.ceil(len(names) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 2.4 * rows), squeeze=False, sharey=True)
    speeds = fleet.speeds
    colours = [_speed_colour(s, speeds) for s in speeds]
    capacity = [s * c for s, c in zip(speeds, fleet.slots, strict=True)]
    fair = [c / sum(capacity) for c in capacity]
    small = len(speeds) <= 20
    for k, name in enumerate(names):
        ax = axes[k // 2][k % 2]
        share = figures[name]["share"]
        if small:
            ax.bar(range(len(share)), share, color=colours, width=0.8)
            ax.scatter(range(len(share)), fair, color="black", marker="_", s=400, label="capacity")
            ax.set_xticks(range(len(share)))
        else:  # many replicas: each one's share relative to its share of the capacity
            relative = [s / f for s, f in zip(share, fair, strict=True)]
            ax.scatter(range(len(share)), relative, c=colours, s=6)
            ax.axhline(1.0, color="black", linewidth=0.6, label="= capacity share")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("replica (deployment-list order)")
    for k in range(len(names), rows * 2):
        axes[k // 2][k % 2].axis("off")
    axes[0][0].set_ylabel("share of requests" if small else "share / capacity share")
    axes[0][0].legend(fontsize=7)
    legend = ", ".join(f"{_speed_colour(v, speeds)[4:]} = speed {v:g}" for v in sorted(set(speeds)))
    fig.suptitle(f"Requests per replica ({legend})")
    fig.tight_layout()
    path = out_dir / "replica_share.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def _speed_colour(speed: float, speeds: Sequence[float]) -> str:
    distinct = sorted(set(speeds))
    palette = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown"]
    return palette[distinct.index(speed) % len(palette)]
