"""The CPU stand-in on a real tritonserver: the wire format, LLM-like timing, overflow codes.

The default dialect: a Triton ensemble ``standin`` (the stock ensemble's inputs) over the python
engine ``tensorrt_llm``; Triton prefixes the engine's errors with "in ensemble 'standin', ".
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.paths import STANDIN_REPOSITORY
from devstack.triton_launcher import (
    StandinSettings,
    TritonServer,
    read_model_config,
    start_standin_replica,
    write_standin_repository,
)

pytestmark = pytest.mark.integration

MODEL = "standin"
ENGINE = "tensorrt_llm"


def generate(server: TritonServer, max_tokens: int, text: str = "hello there", **extra: object):
    return httpx.post(
        f"{server.http_url}/v2/models/{MODEL}/generate",
        json={"text_input": text, "max_tokens": max_tokens, **extra},
        timeout=60,
    )


@pytest.fixture(scope="module")
def fast(workdir: Path) -> Iterator[TritonServer]:
    server = start_standin_replica("fast", StandinSettings(decode_ms_per_token=10), workdir)
    yield server
    server.stop()


def test_repository_config_is_valid_triton_protobuf(tmp_path: Path) -> None:
    ensemble = read_model_config(STANDIN_REPOSITORY / "ensemble" / "config.pbtxt")
    assert ensemble.platform == "ensemble"
    assert {i.name for i in ensemble.input} >= {"text_input", "max_tokens", "stream", "seed"}
    engine = read_model_config(STANDIN_REPOSITORY / ENGINE / "config.pbtxt")
    assert engine.model_transaction_policy.decoupled
    write_standin_repository(
        StandinSettings(speed=0.5, triton_queue_size=3, max_batch_size=2), tmp_path
    )
    written = read_model_config(tmp_path / ENGINE / "config.pbtxt")
    assert written.parameters["speed"].string_value == "0.5"
    assert written.parameters["max_batch_size"].string_value == "2"
    assert written.dynamic_batching.default_queue_policy.max_queue_size == 3
    served = read_model_config(tmp_path / MODEL / "config.pbtxt")
    steps = [step.model_name for step in served.ensemble_scheduling.step]
    assert (served.name, steps) == (MODEL, ["preprocessing", ENGINE])
    assert (tmp_path / "preprocessing" / "1" / "model.py").is_file()
    assert (tmp_path / MODEL / "1").is_dir()


def test_two_ensembles_cannot_share_one_engine(tmp_path: Path) -> None:
    write_standin_repository(StandinSettings(model_name="a"), tmp_path)
    with pytest.raises(ValueError, match="own engine_model"):
        write_standin_repository(StandinSettings(model_name="b"), tmp_path)
    write_standin_repository(StandinSettings(model_name="b", engine_model="b_engine"), tmp_path)
    with pytest.raises(ValueError, match="must differ"):
        StandinSettings(model_name="x", engine_model="x")


def test_generate_returns_text_with_requested_length(fast: TritonServer) -> None:
    response = generate(fast, 7)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL
    assert len(body["text_output"].split()) == 7
    again = generate(fast, 7)
    assert again.json()["text_output"] == body["text_output"]  # deterministic per prompt


def test_optional_sampling_inputs_are_accepted(fast: TritonServer) -> None:
    response = generate(
        fast, 4, temperature=0.7, top_p=0.9, top_k=5, seed=42, min_tokens=2, stop_words=["zzz"]
    )
    assert response.status_code == 200, response.text


def test_only_stock_input_names_are_read(fast: TritonServer) -> None:
    """/generate turns a JSON key that is no input into a request parameter, silently: the
    pre-2025 name ``random_seed`` is ignored, only the stock ``seed`` changes the text."""
    plain = generate(fast, 6).json()["text_output"]
    old_name = generate(fast, 6, random_seed=42)
    assert old_name.status_code == 200, old_name.text
    assert old_name.json()["text_output"] == plain
    assert generate(fast, 6, seed=42).json()["text_output"] != plain


def test_generate_stream_sends_one_event_per_token(fast: TritonServer) -> None:
    events = []
    with httpx.stream(
        "POST",
        f"{fast.http_url}/v2/models/{MODEL}/generate_stream",
        json={"text_input": "hi", "max_tokens": 5, "stream": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert len(events) == 5
    assert all('"text_output"' in e for e in events)


def test_bad_request_is_400(fast: TritonServer) -> None:
    response = generate(fast, 0)
    assert response.status_code == 400
    assert response.json()["error"].startswith("in ensemble 'standin', request_output_len")


def test_trtllm_metrics_published(fast: TritonServer) -> None:
    text = httpx.get(fast.metrics_url).text
    # labelled with the engine's name, as the C++ backend labels them with tensorrt_llm's
    assert (
        f'nv_trt_llm_request_metrics{{model="{ENGINE}",request_type="max",version="1"}} 4' in text
    )
    assert 'kv_cache_block_type="fraction"' in text
    assert "triage_request_duration_us" not in text  # real replicas have no such counter
    assert "triage_request_success" not in text
    # the ensemble's own counters are Triton's, completion-timed
    assert f'nv_inference_request_success{{model="{MODEL}",version="1"}}' in text


def kv_blocks(server: TritonServer) -> dict[str, float]:
    """The engine's ``nv_trt_llm_kv_cache_block_metrics`` by ``kv_cache_block_type``."""
    text = httpx.get(server.metrics_url).text
    return {
        s.labels["kv_cache_block_type"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "nv_trt_llm_kv_cache_block_metrics"
        for s in family.samples
    }


def test_a_shared_prompt_prefix_is_reused_and_counted(fast: TritonServer) -> None:
    """``enable_kv_cache_reuse`` (on by default): a prompt that starts with a prompt already
    computed reuses its full blocks (64 tokens each); ``reused`` counts them since start, as
    TensorRT-LLM's ``reusedBlocks`` does; cached blocks no sequence holds count as free."""
    system = " ".join(f"rule{i} ." for i in range(70))  # 140 tokens: two full blocks
    before = kv_blocks(fast)
    assert generate(fast, 2, system + " first question").status_code == 200
    assert kv_blocks(fast)["reused"] == before["reused"]
    again = generate(fast, 2, system + " another question", return_perf_metrics=True)
    assert again.status_code == 200
    # the request's own count, as the backend answers it with return_perf_metrics
    assert again.json()["kv_cache_reused_blocks"] in (2, [2])
    assert generate(fast, 2, "rule0 . " + system).status_code == 200  # differs from token 3 on
    assert "kv_cache_reused_blocks" not in generate(fast, 2, system).json()  # not asked
    after = kv_blocks(fast)
    assert after["reused"] - before["reused"] == 4
    assert after["used"] == 0 and after["free"] == after["max"] and after["fraction"] == 0
    assert after["tokens_per"] == 64


def test_per_token_latency_grows_with_batch(fast: TritonServer) -> None:
    def one() -> float:
        start = time.perf_counter()
        generate(fast, 40)
        return time.perf_counter() - start

    def four() -> float:
        with cf.ThreadPoolExecutor(4) as pool:
            start = time.perf_counter()
            list(pool.map(lambda _: generate(fast, 40), range(4)))
            return time.perf_counter() - start

    alone = min(one() for _ in range(3))  # the cleanest of three: noise only adds time
    batched = min(four() for _ in range(2))
    # 4 sequences in one batch: 1 + 0.05 * 3 = 1.15x per step; one after another would be 4x
    # (the upper bound leaves room for a busy 2-core machine, where 4 clients compete too)
    assert alone * 1.05 < batched < alone * 3.0, (alone, batched)


def test_speed_factor_half_takes_about_twice_as_long(workdir: Path, fast: TritonServer) -> None:
    slow = start_standin_replica(
        "slow", StandinSettings(decode_ms_per_token=10, speed=0.5), workdir
    )
    try:

        def timed(server: TritonServer) -> float:
            start = time.perf_counter()
            assert generate(server, 30).status_code == 200
            return time.perf_counter() - start

        fast_t = min(timed(fast) for _ in range(3))
        slow_t = min(timed(slow) for _ in range(3))
        assert 1.6 < slow_t / fast_t < 2.5, (fast_t, slow_t)
    finally:
        slow.stop()


def _burst(server: TritonServer, n: int, max_tokens: int) -> list[httpx.Response]:
    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: generate(server, max_tokens), range(n)))


def test_engine_queue_overflow_carries_the_trtllm_executor_message(workdir: Path) -> None:
    """The stand-in fails like TensorRT-LLM's executor (TRITONSERVER_ERROR_INTERNAL, TLLM_THROW's
    text with its " (file:line)" and backtrace), and Triton's ensemble prefixes it.

    On /generate, Triton 2.51's HTTP frontend answers every error that arrives in a response
    with 400 whatever its code (checked with INTERNAL and UNAVAILABLE), as it does for
    "Request timeout expired"; so the gateway must classify overflow by message, not status.
    (/infer answers 501 for an ensemble with a decoupled step.)
    """
    settings = StandinSettings(
        max_active=1, engine_queue_size=2, engine_queue_full="reject", decode_ms_per_token=10
    )
    server = start_standin_replica("engine-full", settings, workdir)
    try:
        # 1.5 s each: the whole burst arrives before the first one ends, even on a busy
        # machine (with 0.5 s, a slow burst once got a 4th request into a freed place)
        responses = _burst(server, 8, 150)
    finally:
        server.stop()
    codes = sorted(r.status_code for r in responses)
    # 1 running + 2 queued; 2 when the 2nd and 3rd arrived before the executor took the 1st
    # off its queue (the executor counts queued requests only, as TensorRT-LLM's does)
    assert codes.count(200) in (2, 3), codes
    rejected = [r for r in responses if r.status_code != 200]
    assert {r.status_code for r in rejected} == {400}
    prefix = "in ensemble 'standin', Maximum queue size of 2 has been reached, please try again"
    assert all(r.json()["error"].startswith(prefix) for r in rejected)
    assert all("executorImpl.cpp:" in r.json()["error"] for r in rejected)


def test_triton_queue_overflow_is_503(workdir: Path) -> None:
    settings = StandinSettings(
        max_active=1,
        engine_queue_size=1,
        engine_queue_full="block",
        triton_queue_size=2,
        decode_ms_per_token=10,
    )
    server = start_standin_replica("triton-full", settings, workdir)
    try:
        responses = _burst(server, 10, 50)
    finally:
        server.stop()
    rejected = [r for r in responses if r.status_code != 200]
    assert rejected, [r.status_code for r in responses]
    # through the ensemble the step's UNAVAILABLE comes back in a response: 400 on /generate
    assert {r.status_code for r in rejected} == {400}, [r.text for r in rejected]
    assert all(
        r.json()["error"].startswith("in ensemble 'standin', ")
        and r.json()["error"].endswith("Exceeds maximum queue size")
        for r in rejected
    )
    assert all("retry-after" not in r.headers for r in rejected)  # Triton never sends it


def test_a_free_port_taken_before_triton_binds_it_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Free ports are ephemeral ones: an outgoing connection (or another server) may take one
    between ``free_port`` and Triton's bind. The launcher then picks new ports (a CI run lost a
    whole test module's stack to "Socket '127.0.0.1:…' already in use")."""
    import socket

    import devstack.triton_launcher as launcher
    from core.paths import free_ports

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    first = [*free_ports(2), taken_port]  # the metrics port is taken
    picks = iter([first])
    monkeypatch.setattr(
        launcher, "free_ports", lambda count: next(picks, None) or free_ports(count)
    )
    try:
        server = launcher.start_standin_replica("port-race", StandinSettings(), tmp_path, 60.0)
    finally:
        taken.close()
    try:
        assert taken_port not in (server.http_port, server.grpc_port, server.metrics_port)
        assert server.is_ready()
    finally:
        server.stop()
