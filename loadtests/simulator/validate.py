"""Loose agreement between the simulator and measured figures: ranking and rough ratios.

A *reference* is ``{policy: {"p95_s": ..., "p99_s": ...}}`` (more keys are ignored). The first
one, ``REFERENCE_SMALL_FLEET``, was measured on real hardware (LiteLLM proxy, 3 OpenAI-like
backends, speeds 1/1/0.5, 4 slots each, 0.5 s per request at speed 1, Poisson arrivals at 85 % of
capacity = 17 req/s, one proxy process; the oracle row is simulated). The comparison runner
(``loadtests/compare.py``) writes more of them to ``loadtests/results/*.json``;
``reference_setup`` reads one, with the fleet it was measured on.

``compare`` checks every pair of policies present in both, for each metric:

* a pair the reference separates clearly (one ``gap`` times the other or more: random vs
  least-busy) must be separated the same way, by at least ``gap``, in the simulator;
* a pair the reference finds close must stay within ``tolerance`` of the reference's ratio.

Absolute figures are not compared: the real runs add proxy and network time, and a policy that
overloads a replica (random here) has a p95 that grows with the length of the run.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loadtests.simulator.engine import Scenario
from loadtests.simulator.model import Fleet, Workload
from loadtests.simulator.report import best_oracle

Figures = Mapping[str, Mapping[str, float]]

REFERENCE_SMALL_FLEET: dict[str, dict[str, float]] = {
    "simple-shuffle": {"p95_s": 23.1, "p99_s": 26.2},
    "least-busy": {"p95_s": 1.06, "p99_s": 1.66},
    "oracle": {"p95_s": 1.00, "p99_s": 1.23},
}
"""Measured on real hardware (oracle: simulated, the speed-aware oracle (loadtests/oracle.py))."""

SIM_NAMES = {"simple-shuffle": "random"}
"""Reference name -> simulator policy; ``oracle`` maps to the run's best oracle."""

RUNNER_NAMES = {"simple-shuffle": "random", "least-busy": "least-busy-redis"}
"""The comparison runner's LiteLLM least-busy keeps its counts in Redis (shared by proxies)."""


def small_fleet(seed: int = 1, duration_s: float = 60.0, **options: Any) -> Scenario:
    """The reference's fleet: speeds 1/1/0.5, 4 slots, 0.5 s at speed 1, 85 % load, 1 proxy.

    60 s of arrivals: the length at which random routing's p95 matches the reference's (its
    slow replica's queue grows ~1.7 req/s, so its p95 ~ 0.35 x run length + 1 s)."""
    return Scenario.build(
        Fleet((1.0, 1.0, 0.5), (4, 4, 4)),
        Workload(service_s=0.5),
        load=0.85,
        duration_s=duration_s,
        seed=seed,
        **options,
    )


def as_reference(
    figures: Mapping[str, Mapping[str, Any]],
    reference: Figures,
    names: Mapping[str, str] = SIM_NAMES,
) -> Figures:
    """The simulator's figures under the reference's policy names (``oracle`` = best oracle)."""
    out: dict[str, Mapping[str, float]] = {}
    for name in reference:
        if name == "oracle":
            best = best_oracle(figures)
            if best is not None:
                out[name] = figures[best]
            continue
        sim_name = names.get(name, name)
        if sim_name in figures:
            out[name] = figures[sim_name]
    return out


def compare(
    sim: Figures,
    reference: Figures,
    keys: tuple[str, ...] = ("p95_s", "p99_s"),
    gap: float = 2.0,
    tolerance: float = 1.6,
) -> list[str]:
    """Disagreements between ``sim`` and ``reference`` (empty: they agree loosely)."""
    problems: list[str] = []
    common = [name for name in reference if name in sim]
    for key in keys:
        for a, b in itertools.combinations(common, 2):
            ra, rb = reference[a].get(key), reference[b].get(key)
            sa, sb = sim[a].get(key), sim[b].get(key)
            if ra is None or rb is None or sa is None or sb is None:
                continue
            ref, got = ra / rb, sa / sb
            if not (math.isfinite(ref) and math.isfinite(got)):
                continue
            label = f"{key} {a}/{b}: reference {ref:.2f}, simulator {got:.2f}"
            if ref >= gap:
                if got < gap:
                    problems.append(f"{label} (reference: clearly worse, by {gap}x or more)")
            elif ref <= 1.0 / gap:
                if got > 1.0 / gap:
                    problems.append(f"{label} (reference: clearly better, by {gap}x or more)")
            elif not ref / tolerance <= got <= ref * tolerance:
                problems.append(f"{label} (outside x{tolerance} of the reference)")
    return problems


def load_reference(path: Path, load: float = 0.85) -> dict[str, dict[str, float]]:
    """A reference from a results file: ``{policy: {...}}`` or ``{"policies": {...}}`` (also
    ``"strategies"`` / ``"runs"`` / ``"results"``), or the comparison runner's
    ``{"meta": ..., "loads": {"0.85": {policy: {...}}}}`` (the level nearest ``load``); figures
    in seconds (``p95_s``) or milliseconds (``p95_ms``). Policies without a p95 are left out."""
    return _figures(_level(json.loads(path.read_text()), load), path)


def reference_setup(
    path: Path, seed: int = 1, load: float = 0.85
) -> tuple[dict[str, dict[str, float]], Scenario, dict[str, str]]:
    """A results file's figures, the scenario to simulate for them and the policy names to
    compare. A comparison-runner file gives its fleet in ``meta`` (replicas, speeds,
    ``max_active``, ``service_s_at_speed_1``, ``seconds``, ``proxies_per_strategy``, the load
    level); any other file is taken as the small reference fleet."""
    data = json.loads(path.read_text())
    figures = _figures(_level(data, load), path)
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or not isinstance(data.get("loads"), dict):
        return figures, small_fleet(seed=seed), dict(SIM_NAMES)
    level = min(data["loads"], key=lambda k: abs(float(k) - load))
    speeds = tuple(float(v) for v in meta["speeds"])
    tokens = meta.get("output_tokens")
    service_s = float(meta["service_s_at_speed_1"])
    decode_ms = service_s * 1000.0 / tokens if isinstance(tokens, int) and tokens > 0 else 20.0
    scenario = Scenario.build(
        Fleet(speeds, (int(meta["max_active"]),) * len(speeds)),
        Workload(service_s=service_s, decode_ms_per_token=decode_ms),
        load=float(level),
        duration_s=float(meta.get("seconds", 60.0)),
        proxies=int(meta.get("proxies_per_strategy", 1)),
        seed=seed,
        warmup_s=0.0,
    )
    return figures, scenario, dict(RUNNER_NAMES)


def _level(data: Any, load: float) -> Any:
    if isinstance(data, dict) and isinstance(data.get("loads"), dict) and data["loads"]:
        return data["loads"][min(data["loads"], key=lambda k: abs(float(k) - load))]
    return data


def _figures(data: Any, path: Path) -> dict[str, dict[str, float]]:
    if isinstance(data, dict):
        for key in ("policies", "strategies", "runs", "results"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of policies")
    out: dict[str, dict[str, float]] = {}
    for name, fig in data.items():
        if not isinstance(fig, dict):
            continue
        row: dict[str, float] = {}
        for q in ("p50", "p95", "p99"):
            if isinstance(fig.get(f"{q}_s"), int | float):
                row[f"{q}_s"] = float(fig[f"{q}_s"])
            elif isinstance(fig.get(f"{q}_ms"), int | float):
                row[f"{q}_s"] = float(fig[f"{q}_ms"]) / 1000.0
        if "p95_s" in row:
            out[str(name)] = row
    return out
