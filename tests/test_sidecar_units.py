"""Pure parts of the sidecar: metrics parsing, health debounce, service-time window, settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.health import HealthDebounce
from gateway.service_time import ServiceTimeWindow
from gateway.sidecar_settings import DEFAULT_COUNTER_PAIRS, SidecarSettings
from gateway.triton_metrics import parse_engine_sample

TRTLLM_TEXT = """\
# HELP nv_inference_pending_request_count Pending
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="ensemble",version="1"} 2
nv_inference_pending_request_count{model="tensorrt_llm",version="1"} 0
# HELP nv_inference_request_success ok
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ensemble",version="1"} 10
# HELP nv_inference_request_duration_us dur
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="ensemble",version="1"} 5000000
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 3
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 64
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 7
# HELP nv_trt_llm_kv_cache_block_metrics KV
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.25
"""

PLAIN_TEXT = """\
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="llm",version="1"} 4
"""


def test_trtllm_gauges_are_primary_and_triton_queue_adds_to_waiting() -> None:
    sample = parse_engine_sample(TRTLLM_TEXT, "ensemble", "tensorrt_llm", DEFAULT_COUNTER_PAIRS)
    assert sample.source == "trtllm"
    assert (sample.active, sample.waiting, sample.max_active) == (7, 3 + 2, 64)
    assert sample.kv_fraction == 0.25
    # the stand-in's pair is absent, so Triton's own counters are used
    assert (sample.duration_us, sample.completed) == (5_000_000, 10)


def test_falls_back_to_pending_count_without_trtllm_gauges() -> None:
    sample = parse_engine_sample(PLAIN_TEXT, "llm", "llm", DEFAULT_COUNTER_PAIRS)
    assert sample.source == "triton"
    assert (sample.waiting, sample.active, sample.max_active) == (4, 0, None)
    assert sample.duration_us is None


@pytest.mark.parametrize(
    ("polls", "states"),
    [
        ([False, False, False], ["unhealthy"] * 3),  # never seen healthy: stays unhealthy
        ([True, False, False, False], ["healthy", "suspect", "suspect", "unhealthy"]),
        ([True, False, False, True], ["healthy", "suspect", "suspect", "healthy"]),
        (
            [True, False, False, False, True],
            ["healthy", "suspect", "suspect", "unhealthy", "healthy"],
        ),
    ],
)
def test_health_debounce(polls: list[bool], states: list[str]) -> None:
    health = HealthDebounce(threshold=3)
    assert [health.observe(ok) for ok in polls] == states


def test_service_time_window() -> None:
    window = ServiceTimeWindow(window_s=10)
    assert window.service_ms is None
    window.add(0.0, 0.0, 0.0)
    window.add(1.0, 2_000_000.0, 4.0)  # 4 requests, 2 s in all: 500 ms each
    assert window.service_ms == pytest.approx(500.0)
    assert window.drain_rps == pytest.approx(4.0)
    window.add(2.0, 2_000_000.0, 4.0)  # idle: the measured speed is kept
    assert window.service_ms == pytest.approx(500.0)
    for t in range(3, 30):  # old samples leave the window: only the new speed counts
        window.add(float(t), 2_000_000.0 + (t - 2) * 1_000_000.0, 4.0 + (t - 2) * 10)
    assert window.service_ms == pytest.approx(100.0)
    window.add(30.0, 0.0, 0.0)  # counters reset (replica restarted)
    assert len(window.samples) == 1


def test_settings_derive_defaults() -> None:
    s = SidecarSettings(replica_id="r1", model="m", triton_url="http://127.0.0.1:8000/")
    assert s.metrics_url == "http://127.0.0.1:8002/metrics"
    assert s.api_base == "http://127.0.0.1:8000"
    assert s.engine_model == "m"
    assert s.ttl_ms == 4 * s.poll_interval_ms


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--poll-interval-ms", "5"], "poll_interval_ms"),
        (["--triton-url", "ftp://host"], "triton_url"),
        (["--unhealthy-after", "0"], "unhealthy_after"),
    ],
)
def test_bad_setting_stops_startup_naming_the_field(args: list[str], field: str) -> None:
    base = {"--replica-id": "r1", "--model": "m", "--triton-url": "http://127.0.0.1:1"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = [a for pair in base.items() for a in pair]
    done = subprocess.run(
        [sys.executable, "-m", "gateway.sidecar", *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert field in done.stderr, done.stderr


def test_step_time_is_busy_time_per_iteration() -> None:
    from gateway.service_time import StepTimeWindow

    w = StepTimeWindow(window_s=10.0, min_iterations=1)
    w.add(0.0, 0, busy=False)
    w.add(0.1, 0, busy=False)
    assert w.step_ms is None  # idle: no estimate yet
    w.add(0.2, 0, busy=True)  # became busy during (0.1, 0.2]: the interval does not count
    w.add(0.3, 10, busy=True)  # 10 iterations in 100 ms
    assert w.step_ms == pytest.approx(10.0)
    w.add(0.5, 30, busy=True)  # 20 in 200 ms
    assert w.step_ms == pytest.approx(10.0)
    w.add(0.6, 31, busy=False)  # went idle: partial interval ignored
    w.add(5.0, 31, busy=False)
    assert w.step_ms == pytest.approx(10.0)  # speed kept while idle
    w.add(5.1, 0, busy=True)  # counter reset (restart)
    w.add(5.2, 5, busy=True)  # 5 in 100 ms: 20 ms per step, the old intervals dropped
    assert w.step_ms == pytest.approx(20.0)
    w.add(15.3, 505, busy=True)  # window moved on: only the last interval counts
    assert w.step_ms == pytest.approx(10100.0 / 500)


def test_step_time_waits_for_enough_iterations() -> None:
    from gateway.service_time import StepTimeWindow

    w = StepTimeWindow(window_s=10.0, min_iterations=50)
    w.add(0.0, 0, busy=True)
    w.add(0.1, 10, busy=True)
    assert w.step_ms is None  # 10 iterations: too few to tell replicas apart
    w.add(0.5, 50, busy=True)
    assert w.step_ms == pytest.approx(10.0)
