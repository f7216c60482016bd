"""A 20-second headless Locust scenario against the embedded stack: nothing lost, a full report.

The stack (Redis, stand-in replicas of unequal speed, sidecars, one LiteLLM proxy with the
plugins) starts on free ports; three keys with priority tiers are created; ``locust --headless``
runs ``loadtests/locustfile.py`` as a subprocess (CSV + the end-of-run report + PNG plots).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.paths import REPO_ROOT
from devstack.stack import Stack
from devstack.stack_settings import StackSettings
from loadtests.keys import create_tier_keys, parse_tiers, write_keys

pytestmark = pytest.mark.integration

RUN_S = 17  # arrivals + drain


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("locust-stack")
    stack = Stack(
        StackSettings(
            catalogue=[],  # a stack of one model: no cold catalogue sidecars
            replicas=2,
            speeds=[1.0, 0.5],
            poll_interval_ms=100,
            workdir=workdir,
            proxies=1,
        )
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def run_locust(
    stack: Stack, tmp_path: Path, tiers: str, *args: str, timeout_s: float
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``locust --headless`` on ``loadtests/locustfile.py`` against the stack with keys of
    ``tiers``, the scenario ``args``: (the finished process, the report folder)."""
    assert stack.redis is not None
    keys = asyncio.run(
        create_tier_keys(stack.redis.url, stack.settings.key_prefix, parse_tiers(tiers))
    )
    report_dir = tmp_path / "report"
    argv = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(REPO_ROOT / "loadtests" / "locustfile.py"),
        "--headless",
        "--only-summary",
        "--stack-state",
        str(stack.workdir / "stack.json"),
        "--keys-file",
        str(write_keys(keys, tmp_path / "keys.json")),
        *args,
        "--report-dir",
        str(report_dir),
    ]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    return done, report_dir


@pytest.mark.timeout(150)
def test_headless_locust_run_loses_nothing_and_reports(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    done, report_dir = run_locust(
        stack,
        tmp_path,
        "interactive:0:2,standard:1:1,batch:2:1",
        "--scenario",
        "steady",
        "--load",
        "0.35",
        "--duration-s",
        str(RUN_S - 6),
        "--output-tokens",
        "uniform:8,24",
        "--workload",  # two tenants, each with its system prompt (loadtests/workloads.py)
        "shared-prefix",
        "--tenants",
        "2",
        "--prefix-tokens",
        "300",
        "--csv",
        str(tmp_path / "csv" / "run"),
        timeout_s=RUN_S + 60,
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    # the default drain (max wait + longest service + 3 Retry-After waits of up to 30 s: over
    # 100 s) is a bound: the run ends once every request is answered
    assert elapsed < RUN_S + 30, elapsed

    report = json.loads((report_dir / "report.json").read_text())
    summary = report["summary"]
    print("\n" + (report_dir / "report.txt").read_text())
    assert summary["started"] > 20, summary
    assert summary["lost"] == 0 and summary["cut"] == 0, summary
    assert summary["ok"] + summary["shed"] + summary["errors"] == summary["started"]
    assert summary["ok"] >= 0.9 * summary["started"], summary
    assert set(summary["share"]) == set(stack.replicas)
    assert sum(summary["share"].values()) == pytest.approx(1.0)
    for key in ("p50_s", "p95_s", "p99_s", "ttft_p95_s", "goodput_rps", "shed_share"):
        assert summary[key] is not None and summary[key] >= 0, key
    assert summary["streams"] > 0 and summary["latency_p50_s"] > 0
    # the tenants' system prompts were served from the replicas' KV caches, and said so
    assert summary["cached_share"] > 0.3, summary["cached_share"]
    assert set(summary["tiers"]) == {"interactive", "standard", "batch"}
    for name in ("latency.png", "replicas.png"):
        png = report_dir / name
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert (report_dir / "records.jsonl").read_text().count("\n") == summary["started"]
    stats = (tmp_path / "csv" / "run_stats.csv").read_text()
    assert "chat stream" in stats and "TTFT" in stats
    assert "LOST 0" in output


@pytest.mark.timeout(120)
def test_requests_running_when_the_run_ends_are_cut_not_lost(stack: Stack, tmp_path: Path) -> None:
    """No drain and long answers: the requests still running when Locust stops its users are
    reported as cut by the run's end, and the run's verdict stays "nothing lost" (exit 0)."""
    done, report_dir = run_locust(
        stack,
        tmp_path,
        "standard:1:1",
        "--scenario",
        "steady",
        "--load",
        "1.2",  # Poisson arrivals, ~7 expected in 6 s (at 0.5: ~3, none in 5 % of the runs)
        "--duration-s",
        "6",
        "--drain-s",
        "0",
        "--output-tokens",
        "fixed:400",
        timeout_s=90,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    summary = json.loads((report_dir / "report.json").read_text())["summary"]
    assert summary["cut"] > 0 and summary["lost"] == 0, summary
    assert (
        summary["ok"] + summary["shed"] + summary["errors"] + summary["cut"] == summary["started"]
    )
    assert "LOST 0" in output and "cut by the run's end" in output
