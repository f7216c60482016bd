"""Pure parts of the sidecar: metrics parsing, health debounce, windows, hidden queue, settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidecar.backlog import HiddenQueue
from sidecar.health import HealthDebounce
from sidecar.service_time import CompletionWindow
from sidecar.settings import SidecarSettings
from sidecar.triton_metrics import parse_engine_sample

TRTLLM_TEXT = """\
# HELP nv_inference_pending_request_count Pending
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="ensemble",version="1"} 2
nv_inference_pending_request_count{model="tensorrt_llm",version="1"} 0
# HELP nv_inference_request_success ok
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ensemble",version="1"} 10
nv_inference_request_success{model="preprocessing",version="1"} 30
# HELP nv_inference_request_failure failed
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="ensemble",version="1"} 3
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 3
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 4
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 64
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 7
# HELP nv_trt_llm_kv_cache_block_metrics KV
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.25
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 4096
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 32
"""

PLAIN_TEXT = """\
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="llm",version="1"} 4
"""


def test_trtllm_gauges_read_with_their_upstream_meanings() -> None:
    sample = parse_engine_sample(TRTLLM_TEXT, "ensemble", "tensorrt_llm")
    assert sample.source == "trtllm"
    # `waiting` (3) is a subset of `active` (7): not added to anything; `max` is the cap
    assert (sample.active, sample.scheduled, sample.max_active) == (7, 4, 64)
    assert sample.pending == 2  # Triton's own queues of the ensemble and the engine
    assert sample.kv_fraction == 0.25
    assert sample.kv_tokens == 4096 * 32  # the KV capacity: max blocks x tokens per block
    # finished = the ensemble's successes + failures; arrivals = preprocessing's successes
    assert (sample.completions, sample.arrivals) == (13, 30)


def test_engine_model_is_detected_when_not_configured() -> None:
    assert parse_engine_sample(TRTLLM_TEXT, "ensemble").engine_model == "tensorrt_llm"
    two = (
        TRTLLM_TEXT
        + TRTLLM_TEXT.split("# HELP nv_trt_llm_request_metrics")[1]
        .replace("tensorrt_llm", "other_engine")
        .split("# HELP")[0]
        .split("\n", 2)[2]
    )
    # two engines on one server and none configured: no guess
    assert parse_engine_sample(two, "ensemble").source == "triton"
    assert parse_engine_sample(two, "ensemble", "tensorrt_llm").active == 7


def test_falls_back_to_pending_count_without_trtllm_gauges() -> None:
    sample = parse_engine_sample(PLAIN_TEXT, "llm", "llm")
    assert sample.source == "triton"
    assert (sample.pending, sample.active, sample.max_active) == (4, 0, None)
    assert sample.completions is None and sample.arrivals is None
    assert sample.kv_tokens is None


def test_hidden_queue_is_what_exceeds_the_drift_measured_with_room() -> None:
    q = HiddenQueue(window_s=30)
    # room in the engine: the queue is empty; 2 requests failed in preprocessing (drift -2)
    assert q.estimate(0.0, arrivals=10, completions=8 + 2, active=2, max_active=4) == 0
    assert q.floor == -2
    # full: 20 arrived, 8 + 2 ended, 4 active -> 6 more than active, plus the 2 of drift
    assert q.estimate(1.0, arrivals=20, completions=10, active=4, max_active=4) == 8
    # with room again the floor is measured anew: a request that the counters count as ended
    # while the gauges still show it active (-3), or one in transit between the steps (-1),
    # shows in one scrape and does not move it
    assert q.estimate(2.0, arrivals=20, completions=18, active=4, max_active=5) == 0
    assert q.estimate(2.1, arrivals=20, completions=19, active=4, max_active=5) == 0
    assert q.estimate(2.2, arrivals=21, completions=19, active=3, max_active=5) == 0
    assert q.floor == -2
    # a lasting drift (4 more requests failed in preprocessing) does, once it is most of the
    # window's samples
    for t in range(3, 8):
        q.estimate(float(t), arrivals=21, completions=25, active=2, max_active=5)
    assert q.floor == -6
    # counters went back: the server restarted, the drift is forgotten
    assert q.estimate(8.0, arrivals=5, completions=0, active=4, max_active=4) == 1
    assert q.floor == 0


def test_completion_window_little_law() -> None:
    window = CompletionWindow(window_s=10)
    assert window.request_ms is None and window.drain_rps is None
    window.add(0.0, 0.0, 4.0)
    window.add(1.0, 8.0, 4.0)  # 4 active all along, 8 finished in 1 s: 500 ms each
    assert window.request_ms == pytest.approx(500.0)
    assert window.drain_rps == pytest.approx(8.0)
    window.add(2.0, 12.0, 0.0)  # 4 more finished, 2 active-seconds: still 500 ms each
    assert window.request_ms == pytest.approx(500.0)
    window.add(3.0, 12.0, 0.0)  # idle: the measured value is kept
    assert window.request_ms == pytest.approx(500.0)
    for t in range(4, 30):  # old samples leave the window: only the new rate counts
        window.add(float(t), 12.0 + (t - 3) * 20, 2.0)
    assert window.request_ms == pytest.approx(100.0)
    window.add(30.0, 0.0, 0.0)  # counters reset (replica restarted)
    assert len(window.samples) == 1


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


def test_settings_derive_defaults() -> None:
    s = SidecarSettings(replica_id="r1", model="m", triton_url="http://127.0.0.1:8000/")
    assert s.metrics_url == "http://127.0.0.1:8002/metrics"
    assert s.api_base == "http://127.0.0.1:8000"
    assert s.engine_model is None  # detected from the metrics
    assert s.arrivals_model == "preprocessing"
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
        [sys.executable, "-m", "sidecar.service", *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert field in done.stderr, done.stderr


def test_step_time_is_busy_time_per_iteration() -> None:
    from sidecar.service_time import StepTimeWindow

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
    from sidecar.service_time import StepTimeWindow

    w = StepTimeWindow(window_s=10.0, min_iterations=50)
    w.add(0.0, 0, busy=True)
    w.add(0.1, 10, busy=True)
    assert w.step_ms is None  # 10 iterations: too few to tell replicas apart
    w.add(0.5, 50, busy=True)
    assert w.step_ms == pytest.approx(10.0)
