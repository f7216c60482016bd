"""The GPU check (build_engines/gpu_check.py): its CPU-side parts everywhere, the check itself
only where an NVIDIA GPU, Triton's tensorrtllm backend and tensorrt-llm are present."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from build_engines import gpu_check
from build_engines.gpu_check import (
    SKIPPED,
    GpuCheckSettings,
    Throughput,
    format_table,
    gateway_config,
    measure,
    run_gpu_check,
    skip_reason,
    tiny_build_settings,
)
from sidecar.tp_launcher import TpReplicaSettings

REASON = skip_reason()


def test_skip_reason_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check.shutil, "which", lambda _: None)
    assert skip_reason() == "no NVIDIA GPU (nvidia-smi not found)"


def test_main_exits_77_when_skipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gpu_check, "skip_reason", lambda _: "no NVIDIA GPU (nvidia-smi not found)")
    assert gpu_check.main([]) == SKIPPED
    assert "gpu check skipped: no NVIDIA GPU (nvidia-smi not found)" in capsys.readouterr().out
    assert gpu_check.main(["--requests", "0"]) == 2


def test_measure_counts_tokens_latency_and_failures() -> None:
    calls = 0

    async def send() -> int:
        nonlocal calls
        calls += 1
        number = calls
        await asyncio.sleep(0.01)
        if number % 5 == 0:
            raise RuntimeError("overflow")
        return 32

    result = asyncio.run(measure("x", send, requests=20, concurrency=4))
    assert (result.requests, result.failures, result.tokens) == (20, 4, 16 * 32)
    assert result.tokens_per_s == pytest.approx(result.tokens / result.seconds)
    assert 10 <= result.p50_ms <= result.p95_ms
    lines = format_table([result, Throughput("y", 1, 0, 0, 0.0, 0.0, 0.0)])
    assert lines[0].split()[:3] == ["path", "requests", "failed"] and len(lines) == 3


def test_tiny_build_plan_is_valid_for_tp_1_2_4(tmp_path: Path) -> None:
    from build_engines.model_shape import ModelShape
    from build_engines.plan import make_plan
    from build_engines.tiny_model import TinyShape

    shape = TinyShape()
    config = {
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
    }
    for tp in (1, 2, 4):
        build = tiny_build_settings("engine", tmp_path, tmp_path / "out", tp)
        build = build.model_copy(update={"gpu_count": 4, "device_memory_mb": 16_000})
        plan = make_plan(build, ModelShape.from_config(config), None)
        assert plan.memory.total_mb < 4_000


def test_gateway_config_fixes_min_tokens(tmp_path: Path) -> None:
    replica = TpReplicaSettings(replica_id="gpu-engine", repository=tmp_path, http_port=8123)
    (deployment,) = gateway_config(replica, max_tokens=48)["model_list"]
    assert deployment["litellm_params"] == {
        "model": "triage_triton/ensemble",
        "api_base": "http://127.0.0.1:8123",
    }
    assert deployment["model_info"]["triage_triton"] == {"extra_inputs": {"min_tokens": 48}}
    assert deployment["model_info"]["id"] == "gpu-engine"


def test_tiny_tokenizer_is_local_and_byte_level() -> None:
    from build_engines.tiny_model import SPECIAL_TOKENS, corpus, train_tokenizer

    tokenizer = train_tokenizer(corpus(), 512)
    assert tokenizer.get_vocab_size() == 512
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    text = "tensor parallel — ünïcode 字"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


@pytest.mark.integration
@pytest.mark.timeout(3600)
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_gpu_check(tmp_path: Path) -> None:
    results, failures = run_gpu_check(GpuCheckSettings(workdir=tmp_path, requests=32))
    assert failures == []
    assert results and all(r.failures == 0 and r.tokens_per_s > 0 for r in results)
