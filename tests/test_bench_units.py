"""Pure parts of the load tests: distributions, arrival sequences, the oracle replay, the report
math, the ratio table, answer parsing, scenarios and settings. No processes are started."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from loadtests.arrivals import Arrival, ArrivalSequence
from loadtests.bench_render import render_level, render_overhead
from loadtests.bench_results import (
    BenchRun,
    Level,
    ModeOverhead,
    Overhead,
    Paired,
    ProxyOverhead,
    StrategyRun,
    compact_results,
    decision_figures,
    ratios,
    targets,
)
from loadtests.bench_settings import BenchSettings
from loadtests.compare import main as bench_main
from loadtests.load_settings import LoadSettings, resolve
from loadtests.measure import (
    REST,
    STOLEN,
    cpu_cores,
    histogram_quantile,
    median_standard_error,
    percentile,
    ratio,
)
from loadtests.oracle import OracleReplica, replay_oracle
from loadtests.report import Record, Summary, plot_runs, render_text, summarize
from loadtests.scenarios import Scenario
from loadtests.traffic import (
    KeyTier,
    LengthDist,
    StandinTiming,
    StreamReading,
    completion,
    openai_error,
    parse_sse_line,
    pick_key,
    prompt_text,
    refusal,
    retry_after_s,
)

# -- length distributions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "mean"),
    [
        ("fixed:25", 25.0),
        ("uniform:16,64", 40.0),
        ("normal:100,10", 100.0),
        ("exp:50", 50.0),
        ("choice:16,64,256", 112.0),
        ("lognormal:100,0.5", 100 * math.exp(0.125)),
    ],
)
def test_length_dist_parse_roundtrip_and_mean(spec: str, mean: float) -> None:
    dist = LengthDist.parse(spec)
    assert LengthDist.parse(str(dist)) == dist
    assert dist.mean() == pytest.approx(mean)
    rng = random.Random(1)
    samples = [dist.sample(rng) for _ in range(4000)]
    assert all(isinstance(s, int) and s >= 1 for s in samples)
    assert sum(samples) / len(samples) == pytest.approx(mean, rel=0.08)


def test_length_dist_clips_to_min_max() -> None:
    dist = LengthDist.parse("normal:10,50;min=5;max=20")
    rng = random.Random(2)
    assert {dist.sample(rng) for _ in range(500)} <= set(range(5, 21))
    assert str(dist) == "normal:10,50;min=5;max=20"


@pytest.mark.parametrize(
    "spec",
    ["", "fixed", "fixed:1,2", "uniform:9,3", "gamma:1", "exp:0", "fixed:-3", "fixed:5;max=x"],
)
def test_length_dist_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="length distribution"):
        LengthDist.parse(spec)


def test_prompt_text_has_the_asked_number_of_stand_in_tokens() -> None:
    text = prompt_text(37, random.Random(3))
    assert len(text.split()) == 37 and text.replace(" ", "").isalpha()


# -- arrival sequences ----------------------------------------------------------------------------


def test_arrivals_are_deterministic_per_seed_and_poisson() -> None:
    a = ArrivalSequence.poisson(20.0, 200.0, 5, "uniform:16,64", "fixed:25", 0.5)
    b = ArrivalSequence.poisson(20.0, 200.0, 5, "uniform:16,64", "fixed:25", 0.5)
    c = ArrivalSequence.poisson(20.0, 200.0, 6, "uniform:16,64", "fixed:25", 0.5)
    assert a.arrivals == b.arrivals
    assert a.arrivals != c.arrivals
    times = [x.t for x in a.arrivals]
    assert times == sorted(times) and times[0] > 0 and times[-1] < 200.0
    assert len(times) / 200.0 == pytest.approx(20.0, rel=0.05)
    gaps = [y - x for x, y in itertools.pairwise(times)]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv == pytest.approx(1.0, abs=0.08)  # exponential gaps
    share = sum(x.stream for x in a.arrivals) / len(a.arrivals)
    assert share == pytest.approx(0.5, abs=0.05)


def test_arrival_times_do_not_depend_on_the_length_distributions() -> None:
    a = ArrivalSequence.poisson(10.0, 30.0, 9, "fixed:10", "fixed:25", 0.0)
    b = ArrivalSequence.poisson(10.0, 30.0, 9, "exp:300", "uniform:1,500", 1.0)
    assert [x.t for x in a.arrivals] == [x.t for x in b.arrivals]


def test_arrivals_save_and_replay_identically(tmp_path: Path) -> None:
    seq = ArrivalSequence.poisson(5.0, 20.0, 1, "uniform:16,64", "exp:25", 0.3, meta={"load": 0.85})
    path = seq.save(tmp_path / "arrivals-0.85.json")
    again = ArrivalSequence.load(path)
    assert again.arrivals == seq.arrivals
    assert again.meta == {"load": 0.85} and again.seed == 1 and again.output == "exp:25"
    doc = json.loads(path.read_text())
    doc["arrivals"][0][0] = 99.0
    with pytest.raises(ValueError, match="must not decrease"):
        ArrivalSequence.from_json(doc)
    with pytest.raises(ValueError, match="format"):
        ArrivalSequence.from_json({**doc, "format": "other"})


# -- the oracle -----------------------------------------------------------------------------------


def test_oracle_serves_without_waiting_when_there_is_room() -> None:
    arrivals = [Arrival(t=float(i), prompt_tokens=10, max_tokens=25, stream=True) for i in range(5)]
    replicas = [OracleReplica("fast", 4, 0.02), OracleReplica("slow", 4, 0.04)]
    out = replay_oracle(arrivals, replicas, 25)
    assert [r.replica for r in out] == ["fast"] * 5
    assert all(r.latency_s == pytest.approx(0.5) and r.ttft_s == pytest.approx(0.02) for r in out)


def test_oracle_queues_fcfs_on_one_replica_and_prefers_the_fast_one() -> None:
    burst = [Arrival(t=0.0, prompt_tokens=1, max_tokens=10, stream=False) for _ in range(3)]
    one = replay_oracle(burst, [OracleReplica("r", 1, 0.1)], 10)
    assert [r.latency_s for r in one] == pytest.approx([1.0, 2.0, 3.0])
    many = [Arrival(t=0.0, prompt_tokens=1, max_tokens=25, stream=False) for _ in range(12)]
    two = replay_oracle(many, [OracleReplica("fast", 4, 0.02), OracleReplica("slow", 4, 0.04)], 25)
    picks = [r.replica for r in two]
    # expected delay (n+1) x s / C: fast 0.125 per request, slow 0.25: 2 fast for each slow
    assert picks.count("fast") == 8 and picks.count("slow") == 4


def test_oracle_matches_the_reference_figures_at_85_percent() -> None:
    """The design reference: speed-aware oracle, speeds 1/1/0.5, 4 slots, 0.5 s, 85 % -> p95/p99 1.00/1.23 s."""
    seq = ArrivalSequence.poisson(17.0, 1500.0, 1, "fixed:10", "fixed:25", 0.0)
    replicas = [OracleReplica(n, 4, s) for n, s in (("a", 0.02), ("b", 0.02), ("c", 0.04))]
    s = summarize(replay_oracle(seq.arrivals, replicas, 25))
    assert s.p95_s == pytest.approx(1.0, abs=0.08)
    assert s.p99_s == pytest.approx(1.25, abs=0.15)
    assert s.share["c"] < 0.2


# -- the report math ------------------------------------------------------------------------------


def rec(t: float, latency: float, outcome: str = "ok", **kw: object) -> Record:
    return Record(t=t, latency_s=latency, outcome=outcome, **kw)  # type: ignore[arg-type]


def test_summarize_counts_outcomes_lost_and_shares() -> None:
    records = [
        rec(0.0, 1.0, replica="a", tokens=10),
        rec(1.0, 2.0, replica="a", tokens=10, stream=True, ttft_s=0.5),
        rec(2.0, 3.0, replica="b", tokens=10, tier="batch"),
        rec(3.0, 0.1, "shed", status=503, retry_after_s=2.0, detail="503 queue_full"),
        rec(4.0, 0.1, "error", status=500, detail="500 x"),
        rec(5.0, 30.0, "lost", detail="timeout"),
    ]
    s = summarize(records, started=8, replica_ids=["a", "b", "c"], window_s=10.0)
    assert (s.started, s.ok, s.shed, s.errors) == (8, 3, 1, 1)
    assert s.lost == 3 and s.lost_failed == 1 and s.lost_unanswered == 2
    assert s.answered == 5
    assert s.shed_share == pytest.approx(1 / 8)
    assert s.shed_with_retry_after == 1
    assert s.share == pytest.approx({"a": 2 / 3, "b": 1 / 3, "c": 0.0})
    assert s.offered_rps == pytest.approx(0.8)
    # goodput: 3 successes from the first start (0) to the last success's end (5)
    assert s.goodput_rps == pytest.approx(3 / 5.0)
    assert s.goodput_tokens_per_s == pytest.approx(30 / 5.0)
    assert s.p50_s == pytest.approx(2.0) and s.latency_max_s == 3.0
    assert s.ttft_p95_s == pytest.approx(0.5)
    assert s.tokens_per_s_p50 == pytest.approx(9 / 1.5)
    assert s.tiers["batch"].requests == 1 and s.tiers["-"].requests == 5
    assert s.detail == {"503 queue_full": 1, "500 x": 1, "timeout": 1}
    text = render_text(s, "unit")
    assert "LOST 3" in text and "a 66.7 %" in text and "tier batch" in text


def test_requests_cut_by_the_runs_end_are_not_lost() -> None:
    """Locust stops its users at the run's end: a request still running then is ``cut``,
    reported apart and not counted as lost (a run with a short drain used to end "LOST 17",
    exit code 1, with nothing lost by the stack)."""
    records = [
        rec(0.0, 1.0, replica="a"),
        rec(1.0, 9.0, "cut", detail="cut by the run's end"),
        rec(2.0, 8.0, "cut", detail="cut by the run's end", stream=True),
    ]
    s = summarize(records, started=3)
    assert (s.ok, s.cut, s.lost, s.lost_unanswered, s.answered) == (1, 2, 0, 0, 1)
    text = render_text(s, "unit")
    assert "LOST 0" in text and "cut by the run's end 2" in text


def test_summarize_answer_bound_and_empty_runs() -> None:
    records = [rec(0.0, 1.0, replica="a"), rec(0.5, 12.0, "shed", status=503), rec(1.0, 20.0)]
    s = summarize(records, answer_bound_s=12.5)
    assert s.answered_within_bound_share == pytest.approx(2 / 3)
    empty = summarize([], started=0)
    assert empty.lost == 0 and math.isnan(empty.p95_s) and empty.share == {}
    assert json.loads(json.dumps(empty.as_json(), allow_nan=False))["p95_s"] is None
    assert summarize(records).answered_within_bound_share is None


def test_records_travel_as_rows() -> None:
    r = rec(1.5, 2.5, replica="x", ttft_s=0.3, tokens=7, stream=True, retries=2, tier="t")
    assert Record.from_row(json.loads(json.dumps(r.row()))) == r


def test_percentile_and_histogram_quantile() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99.5) == pytest.approx(99.505)
    assert math.isnan(percentile([], 95)) and percentile([3.0], 99) == 3.0
    buckets = {0.001: 50.0, 0.005: 99.0, 0.01: 100.0, math.inf: 100.0}
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.001)
    assert histogram_quantile(buckets, 0.99) == pytest.approx(0.005)
    assert histogram_quantile(buckets, 0.995) == pytest.approx(0.0075)
    assert math.isnan(histogram_quantile({math.inf: 0.0}, 0.5))
    figures = decision_figures({0.005: 10.0, math.inf: 10.0}, {0.005: 109.0, math.inf: 110.0})
    assert figures.decisions == 100 and figures.share_within_5ms == pytest.approx(0.99)


def test_median_standard_error_shrinks_with_samples_and_ignores_outliers() -> None:
    rng = random.Random(7)
    small = [rng.gauss(0, 1) for _ in range(50)]
    large = [rng.gauss(0, 1) for _ in range(800)]
    assert 0 < median_standard_error(large) < median_standard_error(small)
    assert median_standard_error(large) == pytest.approx(1.2533 / math.sqrt(800), rel=0.35)
    assert median_standard_error([*large, 1e9]) == pytest.approx(
        median_standard_error(large), rel=0.1
    )
    assert math.isnan(median_standard_error([1.0, 2.0]))


def test_plots_are_written(tmp_path: Path) -> None:
    runs = {
        "x": [rec(i * 0.5, 1.0 + i % 3, replica=f"r{i % 2}", ttft_s=0.2) for i in range(40)]
        + [rec(5.0, 0.05, "shed", status=503)]
    }
    paths = plot_runs(runs, tmp_path, ["r0", "r1"], events=[(10.0, "kill")], prefix="t-")
    assert [p.name for p in paths] == ["t-latency.png", "t-replicas.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


# -- ratios and the table -------------------------------------------------------------------------


def figures(p95: float, p99: float, shed: float = 0.0, goodput: float = 4.0) -> Summary:
    """A summary with these figures (the rest from a small run)."""
    base = summarize([Record(t=0.0, latency_s=1.0, outcome="ok", replica="replica-0")])
    return dataclasses.replace(
        base,
        latency_p50_s=p95 / 2,
        latency_p95_s=p95,
        latency_p99_s=p99,
        ttft_p95_s=p95 / 4,
        goodput_rps=goodput,
        shed_share=shed,
        share={"replica-0": 0.5, "replica-1": 0.5},
    )


def strategy_run(summary: Summary) -> StrategyRun:
    return StrategyRun(
        summary=summary,
        cpu_cores={"proxies": 0.3},
        proxy_cores_max_process=0.3,
        client_lag_p99_ms=1.0,
        wall_s=40.0,
    )


def test_ratio_table_is_ours_over_theirs() -> None:
    strategies = {
        "simple-shuffle": figures(20.0, 25.0),
        "least-busy": figures(4.0, 6.0),
        "triage": figures(2.0, 3.0, shed=0.1, goodput=5.0),
    }
    table = ratios(strategies, figures(1.9, 2.5))
    assert table["triage/simple-shuffle"]["p95_s"] == pytest.approx(0.1)
    assert table["triage/least-busy"]["p99_s"] == pytest.approx(0.5)
    assert table["triage/least-busy"]["goodput_rps"] == pytest.approx(1.25)
    assert math.isnan(table["triage/least-busy"]["shed_share"])  # 0.1 over 0
    assert set(table["triage/oracle"]) == {"p95_s", "p99_s"}
    assert ratio(0.0, 0.0) == 1.0 and math.isnan(ratio(1.0, float("nan")))
    level = Level(
        load=0.85,
        offered_rps=4.25,
        requests=170,
        seed=8,
        order=list(strategies),
        answer_bound_s=10.0,
        runs={name: strategy_run(s) for name, s in strategies.items()},
        oracle=figures(1.9, 2.5),
        ratios=table,
    )
    text = render_level(level, ["replica-0", "replica-1"])
    assert "ratio triage/least-busy" in text and "p99 0.50x" in text and "n/a" in text
    assert "oracle (ps, replayed)" in text


def bench_run(levels: list[Level], overhead: Overhead | None = None) -> BenchRun:
    return BenchRun(
        settings=BenchSettings(),
        date="2026-11-23T00:00:00+00:00",
        cpu_count=2,
        machine_busy_cores_before=0.1,
        levels=levels,
        overhead=overhead,
    )


def test_overhead_reports_idle_and_back_to_back_and_judges_idle() -> None:
    def proxy(idle: float, b2b: float) -> ProxyOverhead:
        return ProxyOverhead(
            by_mode={
                "idle": ModeOverhead(n=100, p50_ms=idle, p95_ms=idle + 5),
                "back-to-back": ModeOverhead(n=100, p50_ms=b2b, p95_ms=b2b + 5),
            },
            cpu_ms_per_request=30.0,
        )

    overhead = Overhead(
        requests=200,
        gap_ms=50.0,
        modes=["idle", "back-to-back"],
        direct_p50_ms={"replica-0": 86.0},
        proxies={"simple-shuffle": proxy(22.0, 21.0), "triage": proxy(22.8, 22.9)},
        plugins_added={
            "idle": Paired(p50_ms=0.8, se_ms=0.3),
            "back-to-back": Paired(p50_ms=1.9, se_ms=0.5),
        },
        plugins_added_cpu_ms=0.9,
    )
    text = render_overhead(overhead)
    assert "half of them 50 ms apart (idle), half back to back" in text
    assert "+0.8 ms at p50 idle (± 0.3 ms standard error), +1.9 ms back to back" in text
    assert "back to back p50   22.9 ms" in text, text
    (line,) = targets(bench_run([], overhead))
    assert line.startswith("  MET  the plugins add +0.8 ms p50") and "back to back +1.9 ms" in line


def test_cpu_stolen_by_the_hypervisor_is_not_other_work() -> None:
    before = {"proxies": 0.0, "machine": 0.0, STOLEN: 0.0}
    after = {"proxies": 4.0, "machine": 12.0, STOLEN: 6.0}  # over 10 s
    used = cpu_cores(before, after, 10.0)
    assert used == pytest.approx({"proxies": 0.4, REST: 0.2, "machine busy": 1.2, STOLEN: 0.6})


def test_compact_results_keep_the_simulator_keys() -> None:
    strategies = {"least-busy": figures(4.0, 6.0), "triage": figures(2.0, 3.0)}
    runs = {name: strategy_run(s) for name, s in strategies.items()}
    runs["triage"].shed_decision = decision_figures({math.inf: 0.0}, {0.005: 9.0, math.inf: 10.0})
    level = Level(
        load=0.85,
        offered_rps=4.25,
        requests=170,
        seed=8,
        order=list(strategies),
        answer_bound_s=10.0,
        runs=runs,
        oracle=figures(1.9, 2.5),
        ratios=ratios(strategies),
    )
    run = bench_run([level])
    compact = compact_results(run)
    entry = compact["loads"]["0.85"]
    assert set(entry) == {"least-busy", "triage", "oracle", "ratios"}
    assert {"p50_s", "p95_s", "p99_s", "ttft_p95_s", "goodput_rps", "shed_share", "lost"} <= set(
        entry["triage"]
    )
    assert entry["triage"]["shed_decision"]["share_within_5ms"] == pytest.approx(0.9)
    assert compact["meta"]["time_scale"] == 4.0
    json.dumps(compact, allow_nan=False)
    assert json.loads(json.dumps(run.as_json(), allow_nan=False))["levels"][0]["load"] == 0.85
    assert targets(run)[0].startswith("  MET  85 %: triage p95 2.00 s <= 1.1 x oracle p95 1.90 s")


# -- reading answers ------------------------------------------------------------------------------


def test_retry_after_prefers_milliseconds_and_parses_dates() -> None:
    assert retry_after_s({"Retry-After": "3", "retry-after-ms": "2500"}) == 2.5
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, 1445412480.0) == 10
    assert retry_after_s({"retry-after-ms": "x", "Retry-After": "4"}) == 4.0
    assert retry_after_s({}) is None and retry_after_s({"Retry-After": "soon"}) is None


def test_openai_error_envelope_and_sse_lines() -> None:
    body = (
        b'{"error": {"message": "at capacity", "type": "x", "param": null, "code": "queue_full"}}'
    )
    assert openai_error(body) == {
        "message": "at capacity",
        "type": "x",
        "param": None,
        "code": "queue_full",
    }
    assert openai_error("<html>") is None and openai_error({"error": "text"}) is None
    chunk = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n'
    assert parse_sse_line(chunk).content == "hi"  # type: ignore[union-attr]
    assert parse_sse_line("data: [DONE]").done  # type: ignore[union-attr]
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    usage = parse_sse_line('data: {"choices": [], "usage": {"completion_tokens": 25}}')
    assert usage is not None and usage.completion_tokens == 25 and usage.content == ""
    error = parse_sse_line('data: {"error": {"message": "boom", "code": "503"}}')
    assert error is not None and error.error == {"message": "boom", "code": "503"}
    broken = parse_sse_line("data: {not json")
    assert broken is not None and broken.error is not None


# -- fleet capacity, keys, scenarios, settings ----------------------------------------------------


def test_capacity_of_the_reference_fleet() -> None:
    timing = StandinTiming(
        max_active=4, decode_ms_per_token=20, batch_slowdown=0, prefill_ms_per_token=0
    )
    assert timing.service_s(25) == pytest.approx(0.5)
    assert timing.fleet_rps([1, 1, 0.5], 25, 0) == pytest.approx(20.0)
    slowed = StandinTiming(4, 20, 0.05, 0.2)
    assert slowed.replica_rps(25, 40, 1.0) < 8.0
    assert BenchSettings().capacity_rps() == pytest.approx(5.0)  # time scale 4
    assert BenchSettings().service_s() == pytest.approx(2.0)


def test_keys_are_drawn_by_weight() -> None:
    keys = [KeyTier(key="a", priority=0, weight=3), KeyTier(key="b", priority=2, weight=1)]
    rng = random.Random(4)
    picks = [pick_key(keys, rng).key for _ in range(4000)]
    assert picks.count("a") / len(picks) == pytest.approx(0.75, abs=0.03)
    assert keys[1].label() == "p2"


def test_scenarios_schedule_the_load() -> None:
    steady = Scenario("steady", duration_s=60, load=0.85, drain_s=10)
    assert steady.load_at(0) == 0.85 and steady.load_at(59.9) == 0.85
    assert steady.load_at(65) == 0.0 and steady.load_at(70) is None
    assert steady.users_at(10, capacity_rps=20, user_rps=0.25) == 68
    assert steady.users_at(65, 20, 0.25) == 0 and steady.users_at(71, 20, 0.25) is None
    ramp = Scenario("ramp", duration_s=100, ramp_from=0.2, ramp_to=1.2)
    assert ramp.load_at(50) == pytest.approx(0.7)
    assert ramp.offered_requests(10) == pytest.approx(700)
    burst = Scenario("burst", duration_s=60, load=0.5, burst_load=2, burst_at_s=20, burst_s=10)
    assert [burst.load_at(t) for t in (19, 20, 29.9, 30)] == [0.5, 2, 2, 0.5]
    assert burst.offered_requests(10) == pytest.approx(10 * (0.5 * 50 + 2 * 10))
    assert tuple(label for _, label in burst.events()[:2]) == ("burst", "burst end")
    with pytest.raises(ValueError, match="kill_at_s"):
        Scenario("kill", duration_s=10, kill_at_s=20)
    with pytest.raises(ValueError, match="scenario"):
        Scenario("storm")  # type: ignore[arg-type]


def test_load_settings_validate_and_resolve_a_stack(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="output_tokens"):
        LoadSettings(output_tokens="gamma:3")
    with pytest.raises(ValidationError, match="base_urls"):
        LoadSettings(base_urls="ftp://x")
    state = {
        "model": "standin",
        "api_key": "sk-stack",
        "proxy_urls": ["http://127.0.0.1:1", "http://127.0.0.1:2"],
        "standin": {"max_active": 4, "decode_ms_per_token": 20.0, "batch_slowdown": 0.0},
        "replicas": {
            "replica-0": {"speed": 1.0, "pid": 11},
            "replica-1": {"speed": 1.0, "pid": 12},
            "replica-2": {"speed": 0.5, "pid": 13},
        },
    }
    (tmp_path / "stack.json").write_text(json.dumps(state))
    settings = LoadSettings(stack_state=tmp_path, output_tokens="fixed:25", prompt_tokens="fixed:1")
    resolved = resolve(settings, host=None)
    assert resolved.base_urls == state["proxy_urls"]
    assert [k.key for k in resolved.keys] == ["sk-stack"]
    assert resolved.capacity_rps == pytest.approx(20 / (1 + 0.2 * 0.001 * 4 * 1 / 0.5), rel=0.01)
    assert resolved.replica_pids == {"replica-0": 11, "replica-1": 12, "replica-2": 13}
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"key": "sk-a", "priority": 0, "weight": 2, "tier": "fast"}]))
    with_keys = resolve(LoadSettings(keys_file=keys, capacity_rps=3.0), host="http://127.0.0.1:9/")
    assert with_keys.base_urls == ["http://127.0.0.1:9"] and with_keys.keys[0].tier == "fast"
    with pytest.raises(ValueError, match="api_key"):
        resolve(LoadSettings(capacity_rps=1.0), host="http://x")
    with pytest.raises(ValueError, match="capacity_rps"):
        resolve(LoadSettings(api_key="k"), host="http://x")


def test_the_default_drain_is_the_longest_a_request_may_still_take(tmp_path: Path) -> None:
    """max_wait + the longest service on the slowest replica + every Retry-After wait;
    ``--drain-s`` wins when given."""
    state = {
        "api_key": "k",
        "proxy_urls": ["http://127.0.0.1:1"],
        "standin": {"max_active": 4, "decode_ms_per_token": 20.0, "batch_slowdown": 0.0},
        "replicas": {"a": {"speed": 1.0}, "b": {"speed": 0.5}},
    }
    (tmp_path / "stack.json").write_text(json.dumps(state))
    settings = LoadSettings(
        stack_state=tmp_path,
        output_tokens="uniform:8,400",
        prompt_tokens="fixed:1",
        max_retries=2,
        max_retry_wait_s=5,
        max_wait_s=10,
    )
    longest = 400 * 0.020 / 0.5 + 0.2 * 1 / 0.5 / 1000  # 400 tokens at half speed
    assert resolve(settings, host=None).drain_s == pytest.approx(10 + longest + 2 * 5)
    given = settings.model_copy(update={"drain_s": 3.0})
    assert resolve(given, host=None).drain_s == 3.0
    assert settings.scenario_spec(7.0).end_s == settings.duration_s + 7.0
    # without the stand-in's timing, the per-attempt timeout bounds the service
    blind = resolve(LoadSettings(api_key="k", capacity_rps=1.0, max_retries=0), host="http://x")
    assert blind.drain_s == pytest.approx(10.0 + 120.0)


@pytest.mark.parametrize(
    ("spec", "upper"),
    [
        ("fixed:25", 25),
        ("uniform:16,64", 64),
        ("choice:16,256,64", 256),
        ("normal:100,10", 130),
        ("exp:10", 10 * math.log(1000)),
        ("lognormal:100,0.5;max=300", 300),
    ],
)
def test_length_dist_upper_is_a_length_few_samples_exceed(spec: str, upper: float) -> None:
    dist = LengthDist.parse(spec)
    assert dist.upper() == pytest.approx(upper)
    rng = random.Random(1)
    samples = [dist.sample(rng) for _ in range(5000)]
    assert sum(x > dist.upper() + 0.5 for x in samples) <= 10


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--speeds", "[1,1]"], "speeds"),
        (["--loads", "[0]"], "loads"),
        (["--time-scale", "-1"], "time_scale"),
        (["--output-tokens", "wat"], "output_tokens"),
        (["--strategies", '["triage","triage"]'], "strategies"),
        (["--admission", '{"bogus": "1"}'], "admission"),
        (["--admission", '{"max_wait_ms": "soon"}'], "admission"),
    ],
)
def test_bench_rejects_bad_settings_with_exit_2(
    args: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_main(args) == 2
    assert f"invalid setting {field}" in capsys.readouterr().err


def test_burst_report_prints_each_burst_beside_the_baseline() -> None:
    from loadtests.bench_burst import BurstReport, quantile, render

    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and quantile([], 0.5) is None
    base = BurstReport(1, 24, 24, 0, 0, None, None, 4.0, None, None, 0, None, 370.0)
    burst = BurstReport(10, 240, 72, 168, 0, 110.0, 130.0, 10.0, 16.0, 26.0, 165, 165 / 168, 372.0)
    table = render(24, [burst], base)
    assert "fleet capacity 24" in table
    row = table.splitlines()[-1]
    assert row.split()[:5] == ["10x", "240", "72", "168", "0"]
    assert "2.50x" in row and "98% (165/168)" in row


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["nope"], "unknown kind 'nope'"),
        (["decisions", "--replicas", "0"], "triage bench decisions: invalid setting replicas"),
        (["burst", "--bursts", "x"], "triage bench burst: invalid setting bursts"),
        (["compare", "--speeds", "[1,2]"], "triage bench: invalid setting speeds"),
        (["--speeds", "[1,2]"], "triage bench: invalid setting speeds"),  # compare by default
    ],
)
def test_triage_bench_dispatches_each_kind_and_names_the_bad_setting(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One ``triage bench`` with a subcommand per benchmark, each with its own settings model
    and env prefix (``TRIAGE_BENCH_``, ``TRIAGE_BENCH_DECISIONS_``, ``TRIAGE_BENCH_BURST_``)."""
    from loadtests.bench_burst import BurstSettings
    from loadtests.bench_settings import DecisionSettings
    from triage.cli import main as triage_main

    assert triage_main(["bench", *argv]) == 2
    assert says in capsys.readouterr().err
    prefixes = {
        m.model_config.get("env_prefix") for m in (BenchSettings, DecisionSettings, BurstSettings)
    }
    assert prefixes == {"TRIAGE_BENCH_", "TRIAGE_BENCH_DECISIONS_", "TRIAGE_BENCH_BURST_"}


def test_answers_read_alike_for_locust_and_the_bench() -> None:
    """One reading of an answer (``traffic.refusal`` / ``completion`` / ``StreamReading``)
    serves Locust and ``triage bench``: the outcome a report counts comes from here."""
    envelope = json.dumps({"error": {"message": "full", "code": "queue_full"}})
    shed = refusal(503, None, envelope, {"Retry-After": "2"})
    assert (shed.outcome, shed.detail, shed.retry_after_s) == ("shed", "503 queue_full", 2.0)
    assert refusal(400, "r", envelope, {}).outcome == "error"
    assert refusal(502, "r", b"Bad Gateway", {}).detail == "HTTP 502 malformed"
    body = json.dumps(
        {"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": 3}}
    )
    assert (completion(200, "r", body).outcome, completion(200, "r", body).tokens) == ("ok", 3)
    assert completion(200, "r", b"{}").outcome == "lost"
    reading = StreamReading(200, "r", started=10.0)
    chunk = {"choices": [{"delta": {"content": "a"}}]}
    assert reading.line(f"data: {json.dumps(chunk)}", 10.5) is None
    assert reading.line('data: {"choices": [], "usage": {"completion_tokens": 7}}', 11.0) is None
    done = reading.line("data: [DONE]", 11.0)
    assert done is not None and (done.outcome, done.ttft_s, done.tokens) == ("ok", 0.5, 7)
    empty = StreamReading(200, "r", 0.0)
    assert empty.line("data: [DONE]", 1.0).outcome == "lost"  # type: ignore[union-attr]
    assert StreamReading(200, "r", 0.0).cut_short().detail == "stream truncated"


def test_fairness_bench_arrivals_and_figures() -> None:
    """``triage bench fairness``: the flood sends flood_multiple x a steady tenant's rate, all
    together load x capacity; the same arrivals without the flood; Jain's index over the
    steady tenants' goodput / fair share."""
    from loadtests.bench_fairness import FairnessSettings, Result, arrivals, figures

    s = FairnessSettings(seconds=200.0, replicas=2, speeds=[1.0, 1.0], load=1.2)
    plan = arrivals(s, 4, flood=True)
    per = Counter(a.tenant for a in plan)
    capacity = s.capacity_rps()  # 2 x 4 slots / (20 x 25 ms) = 16 req/s
    assert capacity == pytest.approx(16.0)
    steady = 1.2 * capacity / (3 + 5)
    assert per[0] / 200 == pytest.approx(5 * steady, rel=0.1)
    assert per[2] / 200 == pytest.approx(steady, rel=0.2)
    without = arrivals(s, 4, flood=False)
    assert without == [a for a in plan if a.tenant != 0]
    results = [Result(a.tenant, 200, 0.5) for a in without] + [Result(0, 503, 0.01, code="x")]
    run = figures("r", results, 4, s)
    assert run.jain == pytest.approx(1.0, abs=0.02)
    assert run.codes == {"503 x": 1}
    skewed = [r for i, r in enumerate(results) if r.tenant != 1 or i % 2 == 0]  # 1 halved
    assert figures("r", skewed, 4, s).jain < 0.95
