"""The fleet simulator (``loadtests/simulator``): model, policies, validation, CLI. Fast: no
processes, no network; every run is seeded."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import plugins.routing.policy as routing_policy
from loadtests.simulator.__main__ import main, parse_speeds
from loadtests.simulator.engine import Scenario, run
from loadtests.simulator.model import Fleet, PrefixCache, Workload
from loadtests.simulator.policies import TriagePolicy, make_policy
from loadtests.simulator.report import best_oracle, ratios, summarize, table
from loadtests.simulator.validate import (
    REFERENCE_SMALL_FLEET,
    SIM_NAMES,
    as_reference,
    compare,
    load_reference,
    reference_setup,
    small_fleet,
)

RESULTS = Path(__file__).resolve().parent.parent / "loadtests" / "results"
SMALL_POLICIES = ["random", "least-busy", "jsq", "triage", "oracle", "oracle-sed", "oracle-ps"]


def figures_of(scenario: Scenario, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: summarize(run(scenario, make_policy(name))) for name in names}


def fleet_200(replicas: int = 200, proxies: int = 20, **options: Any) -> Scenario:
    """The headline fleet, shortened: 200 replicas (1/3 at half speed), 20 proxies, 250 ms."""
    speeds = parse_speeds("1/3@0.5", replicas, seed=1)
    return Scenario.build(
        Fleet(tuple(speeds), (4,) * replicas),
        Workload(service_s=0.5),
        load=0.85,
        requests=options.pop("requests", 6000),
        proxies=proxies,
        warmup_s=3.0,
        seed=options.pop("seed", 1),
        **{"poll_interval_s": 0.25, **options},
    )


# -- the model ------------------------------------------------------------------------------


def test_fifo_replica_times_are_exact() -> None:
    """One replica, 1 slot, 0.5 s per request: the second waits for the first."""
    scenario = Scenario.build(
        Fleet((1.0,), (1,)),
        Workload(service_s=0.5),
        arrival_times=[0.0, 0.1, 2.0],
        warmup_s=0.0,
    )
    result = run(scenario, make_policy("random"))
    assert result.start == pytest.approx([0.0, 0.5, 2.0])
    assert result.finish == pytest.approx([0.5, 1.0, 2.5])
    assert result.first == pytest.approx([0.02, 0.52, 2.02])  # one 20 ms step after the start


def test_speed_scales_service_and_slots_run_in_parallel() -> None:
    scenario = Scenario.build(
        Fleet((0.5,), (2,)),
        Workload(service_s=0.5),
        arrival_times=[0.0, 0.0, 0.0],
        warmup_s=0.0,
    )
    result = run(scenario, make_policy("random"))
    assert sorted(result.finish) == pytest.approx([1.0, 1.0, 2.0])


def test_batch_slowdown_model_completes_everything() -> None:
    """The stand-in's shared step time: a full batch is slower than a lone sequence."""
    alone = Scenario.build(
        Fleet((1.0,), (4,)), Workload(service_s=0.5), arrival_times=[0.0], warmup_s=0.0
    )
    full = Scenario.build(
        Fleet((1.0,), (4,)),
        Workload(service_s=0.5),
        arrival_times=[0.0] * 4,
        warmup_s=0.0,
        batch_slowdown=0.1,
    )
    assert run(alone, make_policy("random")).finish == pytest.approx([0.5])
    batched = run(full, make_policy("random"))
    assert batched.finish == pytest.approx([0.5 * 1.3] * 4)  # step x (1 + 0.1 x 3)
    skewed = small_fleet(duration_s=20.0, batch_slowdown=0.05)
    result = run(skewed, make_policy("triage"))
    assert all(math.isfinite(f) for f in result.finish)
    assert all(f - a >= 0.5 - 1e-9 for f, a in zip(result.finish, skewed.arrivals, strict=True))


def test_queue_limit_rejects_as_503() -> None:
    scenario = Scenario.build(
        Fleet((1.0,), (1,)),
        Workload(service_s=0.5),
        arrival_times=[0.0, 0.0, 0.0, 0.0],
        warmup_s=0.0,
        queue_limit=1,
    )
    result = run(scenario, make_policy("jsq"))
    assert result.replica_of == [0, 0, -1, -1]
    assert summarize(result)["rejected_share"] == pytest.approx(0.5)


# -- policies -------------------------------------------------------------------------------


def test_policy_shapes_on_a_skewed_fleet() -> None:
    """Speeds 1/1/0.5: the oracles <= JSQ (count only) <= random (overloads the slow one)."""
    figures = figures_of(small_fleet(duration_s=120.0), SMALL_POLICIES)
    p95 = {name: fig["p95_s"] for name, fig in figures.items()}
    best = best_oracle(figures)
    assert best is not None
    assert p95[best] <= p95["jsq"] <= p95["random"]
    assert p95["random"] > 10 * p95["jsq"]
    # speed-aware policies give the slow replica less than its count share
    assert figures["triage"]["share"][2] < figures["jsq"]["share"][2]
    assert figures["jsq"]["share"][2] < figures["random"]["share"][2]


def test_least_busy_counts_only_its_own_proxy() -> None:
    """LiteLLM's least-busy: per-proxy counts, ties to the first deployment. With 20 proxies
    each sees mostly zeros and all of them pile onto the first replicas of the list."""
    scenario = fleet_200(requests=4000)
    lb = summarize(run(scenario, make_policy("least-busy")))
    jsq = summarize(run(scenario, make_policy("jsq")))
    assert lb["p95_s"] > 2 * jsq["p95_s"]
    assert lb["p50_s"] > 1.5 * jsq["p50_s"]  # the wait is everywhere, not only in the tail


def test_triage_calls_the_real_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator's triage decisions come from plugins.routing.policy (spied, not replaced)."""
    calls = {"score": 0, "choose": 0}

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    scenario = small_fleet(duration_s=10.0)
    plain = run(scenario, make_policy("triage"))
    monkeypatch.setattr(routing_policy, "score", spy("score", routing_policy.score))
    monkeypatch.setattr(routing_policy, "choose", spy("choose", routing_policy.choose))
    spied = run(scenario, make_policy("triage"))
    assert calls["choose"] == len(scenario.arrivals)  # one real choose() per request
    assert calls["score"] >= len(scenario.arrivals)
    assert spied.replica_of == plain.replica_of


def test_triage_follows_a_changed_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a copy: a different score() (here: ignore speed) changes the simulated routing."""
    scenario = small_fleet(duration_s=30.0)
    real = summarize(run(scenario, make_policy("triage")))
    original = routing_policy.score

    def speed_blind(state: Any, inflight: int, service_ms: float, *args: Any) -> float:
        return original(state, inflight, 1.0, *args)

    monkeypatch.setattr(routing_policy, "score", speed_blind)
    blind = summarize(run(scenario, make_policy("triage")))
    assert blind["share"][2] > real["share"][2] + 0.04  # the slow replica gets more


@pytest.mark.parametrize(
    ("options", "fast_share"),
    [
        # every replica known from its first publish (all within the first 250 ms)
        ({"service_source": "true", "requests": 2000}, (0.8, 1.0)),
        # hashes 0.6-1.1 s old: some replica is always unknown, so choose() sees the whole fleet
        (
            {
                "service_source": "true",
                "requests": 1500,
                "poll_interval_s": 0.5,
                "staleness_s": 0.6,
            },
            (0.0, 0.0),
        ),
        # measured service times: unknown until 50 busy iterations (~3 s), then known (a
        # smaller fleet, so that the whole-fleet choose() of the warm-up stays cheap)
        ({"replicas": 60, "proxies": 6, "requests": 2000}, (0.05, 0.8)),
    ],
    ids=["fresh", "stale", "measured"],
)
def test_triage_fast_path_picks_as_choose_over_the_whole_fleet(
    options: dict[str, Any], fast_share: tuple[float, float]
) -> None:
    scenario = fleet_200(**options)
    exact = TriagePolicy(exact=True, sized=False)  # the fast path is the count score's
    fast = TriagePolicy(sized=False)
    assert run(scenario, fast).replica_of == run(scenario, exact).replica_of
    assert exact.fast_picks == 0
    share = fast.fast_picks / len(scenario.arrivals)
    assert fast_share[0] <= share <= fast_share[1]


def test_runs_are_deterministic_per_seed() -> None:
    a = run(small_fleet(seed=3, duration_s=10.0), make_policy("triage"))
    b = run(small_fleet(seed=3, duration_s=10.0), make_policy("triage"))
    c = run(small_fleet(seed=4, duration_s=10.0), make_policy("triage"))
    assert a.replica_of == b.replica_of and a.finish == b.finish
    assert a.finish != c.finish


# -- validation against measured figures ----------------------------------------------------


def validate(
    reference: dict[str, dict[str, float]],
    scenario: Scenario | None = None,
    names: dict[str, str] = SIM_NAMES,
) -> None:
    policies = sorted({*SMALL_POLICIES, *(names.get(n, n) for n in reference if n != "oracle")})
    figures = figures_of(scenario or small_fleet(), policies)
    sim = as_reference(figures, reference, names)
    assert len(sim) >= 2, f"no policy of {sorted(reference)} simulated"
    assert compare(sim, reference) == []
    best = best_oracle(figures)
    assert best is not None
    assert figures["triage"]["p95_s"] <= 1.3 * figures[best]["p95_s"]


def test_small_fleet_matches_the_reference_figures() -> None:
    """Ranking simple-shuffle >> least-busy ~ oracle, rough ratios; triage near the oracle."""
    validate(REFERENCE_SMALL_FLEET)


def result_files() -> list[Path]:
    return sorted(RESULTS.glob("*.json")) if RESULTS.is_dir() else []


def test_the_comparison_runners_results_are_committed() -> None:
    """The check below needs them: a missing or renamed folder must fail, not skip."""
    assert [p.name for p in result_files()] == ["bench-1proxy.json", "bench-4proxies.json"]


@pytest.mark.parametrize("path", result_files(), ids=lambda p: p.name)
def test_simulator_matches_the_comparison_runner(path: Path) -> None:
    """Every results file of the real comparison runner, simulated on the fleet it describes."""
    reference, scenario, names = reference_setup(path)
    known = {"simple-shuffle", "random", "least-busy", "triage", "oracle", "jsq"}
    assert len(known & set(reference)) >= 2, f"{path.name}: fewer than two comparable policies"
    validate(reference, scenario, names)


def runner_file(tmp_path: Path) -> Path:
    """A results file in the comparison runner's compact form (``compact_results``)."""
    path = tmp_path / "bench.json"
    level = {
        "simple-shuffle": {"p50_s": 0.6, "p95_s": 23.1, "p99_s": 26.2},
        "least-busy": {"p50_s": 0.55, "p95_s": 1.06, "p99_s": 1.66},
        "triage": {"p50_s": 0.6, "p95_s": 1.02, "p99_s": 1.25},
        "oracle": {"p50_s": 0.6, "p95_s": 1.00, "p99_s": 1.23},
        "ratios": {"triage/oracle": {"p95_s": 1.02, "p99_s": 1.02}},
    }
    meta = {
        "replicas": 3,
        "speeds": [1.0, 1.0, 0.5],
        "max_active": 4,
        "service_s_at_speed_1": 0.5,
        "output_tokens": 25,
        "seconds": 60,
        "proxies_per_strategy": 1,
    }
    path.write_text(json.dumps({"meta": meta, "loads": {"0.5": level, "0.85": level}}))
    return path


def test_runner_results_are_read_with_their_fleet(tmp_path: Path) -> None:
    reference, scenario, names = reference_setup(runner_file(tmp_path))
    assert set(reference) == {"simple-shuffle", "least-busy", "triage", "oracle"}
    assert reference["least-busy"] == {"p50_s": 0.55, "p95_s": 1.06, "p99_s": 1.66}
    assert scenario.fleet == Fleet((1.0, 1.0, 0.5), (4, 4, 4))
    assert scenario.capacity_rps == pytest.approx(20.0)
    assert len(scenario.arrivals) == pytest.approx(17 * 60, rel=0.1)
    assert names["least-busy"] == "least-busy-redis"  # LiteLLM least-busy with Redis counts
    validate(reference, scenario, names)


def test_compare_flags_a_wrong_ranking() -> None:
    swapped = {
        "simple-shuffle": {"p95_s": 1.0, "p99_s": 1.2},
        "least-busy": {"p95_s": 23.0, "p99_s": 26.0},
    }
    assert compare(swapped, REFERENCE_SMALL_FLEET)
    close = {"least-busy": {"p95_s": 3.0, "p99_s": 4.0}, "oracle": {"p95_s": 1.0, "p99_s": 1.2}}
    assert compare(close, REFERENCE_SMALL_FLEET)  # 3x where the reference says ~1.06x


def test_load_reference_reads_seconds_and_milliseconds(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {
                "policies": {
                    "least-busy": {"p95_ms": 1060, "p99_ms": 1660},
                    "triage": {"p95_s": 1.0, "p99_s": 1.2},
                    "broken": {"req_s": 3},
                }
            }
        )
    )
    assert load_reference(path) == {
        "least-busy": {"p95_s": 1.06, "p99_s": 1.66},
        "triage": {"p95_s": 1.0, "p99_s": 1.2},
    }
    assert load_reference(runner_file(tmp_path))["oracle"]["p99_s"] == 1.23


# -- the large fleet ------------------------------------------------------------------------


def test_reduced_200_replica_scenario() -> None:
    """200 replicas / 20 proxies / 250 ms polls, shortened: triage within 1.2x of the oracle."""
    figures = figures_of(fleet_200(), ["jsq", "triage", "oracle", "oracle-sed", "oracle-ps"])
    best = best_oracle(figures)
    assert best is not None
    assert figures["triage"]["p95_s"] <= 1.2 * figures[best]["p95_s"]
    assert ratios(figures)["best-oracle"]["p95_s"] <= 1.2
    assert "triage vs the best oracle" in table(figures)


# -- CLI --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "replicas", "expected"),
    [
        ("", 2, [1.0, 1.0]),
        ("1,1,0.5", 3, [1.0, 1.0, 0.5]),
        ("0.25@0.5", 8, sorted([0.5, 0.5] + [1.0] * 6)),
        ("fraction 0.25 at 0.5", 8, sorted([0.5, 0.5] + [1.0] * 6)),
        ("1/3@0.5,1/3@2", 6, [0.5, 0.5, 1.0, 1.0, 2.0, 2.0]),
    ],
)
def test_parse_speeds(text: str, replicas: int, expected: list[float]) -> None:
    speeds = parse_speeds(text, replicas)
    assert (sorted(speeds) if "@" in text or " at " in text else speeds) == expected


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--speeds", "1,0.5"], "speeds"),
        (["--load", "0"], "load"),
        (["--policies", "random,nope"], "policies"),
        (["--replicas", "2", "--slots", "4,4,4"], "slots"),
        (["--speeds", "2@0.5"], "speeds"),
    ],
)
def test_cli_rejects_invalid_settings(
    argv: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert f"invalid setting {field}" in capsys.readouterr().err


def test_cli_env_settings_are_validated(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIAGE_SIM_PROXIES", "0")
    assert main([]) == 2
    assert "invalid setting proxies" in capsys.readouterr().err


def test_cli_writes_table_json_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--speeds",
            "1,1,0.5",
            "--requests",
            "600",
            "--policies",
            "random,jsq,triage,oracle",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| triage |" in out and "triage vs the best oracle (oracle)" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["policies"]) == {"random", "jsq", "triage", "oracle"}
    assert data["ratios"]["random"]["p95_s"] > 0
    assert load_reference(tmp_path / "results.json")["triage"]["p95_s"] > 0
    for png in ("latency_over_time.png", "replica_share.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


# -- shared prefixes: KV caches, the proxies' index, the cache-aware oracle --------------------

PROMPTS = dict(groups=4, prefix_tokens=2000, own_tokens=200, prefill_ms_per_token=0.1)


def test_prefix_cache_is_an_lru_of_tenants() -> None:
    cache = PrefixCache(2)
    assert [cache.use(g) for g in (1, 2, 1, 3)] == [False, False, True, False]
    assert 1 in cache and 3 in cache and 2 not in cache  # 2 was the least recently used
    assert not PrefixCache(0).use(1) and not PrefixCache(0).use(1)  # holds nothing
    assert not cache.use(-1) and -1 not in cache  # a request without a tenant


def test_a_request_pays_the_prefill_its_replica_does_not_hold() -> None:
    """One replica, one slot: the first of a tenant prefills 2200 tokens (0.22 s), the next of
    the same tenant only its own 200 (0.02 s), another tenant's the whole prompt again."""
    workload = Workload(service_s=0.5, **PROMPTS)
    scenario = Scenario(
        fleet=Fleet((1.0,), (1,)),
        workload=workload,
        arrivals=(0.0, 0.1, 0.2),
        tokens=(25.0, 25.0, 25.0),
        proxy_of=(0, 0, 0),
        group_of=(0, 0, 1),
        cache_prefixes=4,
        window_s=0.2,
    )
    result = run(scenario, make_policy("random"))
    assert result.cached == [0, 2000, 0]
    first_done = 0.22 + 0.5
    second_done = first_done + 0.02 + 0.5
    assert result.finish == pytest.approx([first_done, second_done, second_done + 0.22 + 0.5])
    assert result.first[1] == pytest.approx(first_done + 0.02 + 0.02)  # prefill + one step
    assert summarize(result)["cached_share"] == pytest.approx(2000 / (3 * 2200))


def test_the_oracle_knows_which_replica_holds_the_prefix() -> None:
    """Two idle replicas, the second holds tenant 0: the earliest completion is there."""
    scenario = Scenario(
        fleet=Fleet((1.0, 1.0), (4, 4)),
        workload=Workload(service_s=0.5, **PROMPTS),
        arrivals=(0.0, 1.0),
        tokens=(25.0, 25.0),
        proxy_of=(0, 0),
        group_of=(0, 0),
        cache_prefixes=4,
        window_s=1.0,
    )
    oracle = make_policy("oracle")
    result = run(scenario, oracle)
    assert result.replica_of[1] == result.replica_of[0]
    assert result.cached == [0, 2000]


PREFILL_PARAMS = routing_policy.PolicyParams(prefill_ms_per_token=0.1)
"""The policy's prefill cost, as an operator sets it for ``PROMPTS``."""


def eight_tenants_on_six_replicas(load: float, **workload: Any) -> Scenario:
    """An even fleet of 6 (4 slots each), 8 tenants, room for 2 prefixes per replica."""
    return Scenario.build(
        Fleet((1.0,) * 6, (4,) * 6),
        Workload(service_s=0.5, **{**PROMPTS, "groups": 8, **workload}),
        load=load,
        requests=1500,
        proxies=3,
        cache_prefixes=2,
        warmup_s=2.0,
    )


def test_triage_keeps_tenants_on_the_replicas_its_index_names() -> None:
    """An even fleet, 8 tenants, room for 2 prefixes per replica: random routing finds few
    prefixes cached; triage's index (written at each pick, read by the next) finds most, and
    only the index differs from triage without affinity."""
    scenario = eight_tenants_on_six_replicas(0.5, lengths="exponential")
    share = {
        name: summarize(run(scenario, make_policy(name, PREFILL_PARAMS)))["cached_share"]
        for name in ("random", "triage-no-affinity", "triage")
    }
    assert share["triage"] > 0.6 > 0.4 > share["triage-no-affinity"], share
    assert share["random"] < 0.4, share


def test_one_hot_tenant_is_spread_when_its_replicas_are_busy() -> None:
    """Half the traffic from one tenant at 85 % load: more than its replicas can serve, so load
    wins over affinity and the tenant's prefix ends up cached on most replicas."""
    scenario = eight_tenants_on_six_replicas(0.85, hot_share=0.5)
    result = run(scenario, make_policy("triage", PREFILL_PARAMS))
    hot = [r for r, g in zip(result.replica_of, scenario.group_of, strict=True) if g == 0]
    assert len(set(hot)) >= 4, sorted(set(hot))
    assert max(summarize(result)["share"]) < 0.3
