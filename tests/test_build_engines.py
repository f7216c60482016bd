"""build_engines: settings, plan validation, memory estimate, exact commands, the build run
(with stand-in tools for tensorrt-llm), the manifest, and the ``triage build-engine`` CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shlex
import stat
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import text_format
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2

from build_engines import convert_checkpoint
from build_engines.commands import build_steps
from build_engines.gpus import GpuInfo, parse_nvidia_smi, query_gpus
from build_engines.main import launch_hint, launch_settings, main
from build_engines.manifest import engine_path_supported
from build_engines.model_shape import ModelShape, ModelShapeError
from build_engines.plan import PlanError, estimate_memory, make_plan
from build_engines.repository import check_engine_repository
from build_engines.runner import StepFailed, run_step
from build_engines.settings import BuildSettings, load_settings
from sidecar.tp_launcher import TpReplicaSettings, launch_argv
from triage import cli

# Llama-3-8B's shape (8,030,261,248 parameters)
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}
H100_MIB = 81559


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "Llama-3-8B"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(LLAMA_8B))
    (path / "tokenizer.json").write_text("{}")
    (path / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 64)
    return path


def make_settings(model_dir: Path, out: Path, **kw: object) -> BuildSettings:
    base: dict[str, object] = {
        "model_dir": model_dir,
        "output_dir": out,
        "gpu_count": 8,
        "device_memory_mb": H100_MIB,
        "max_batch_size": 16,
        "python": "python3",
    }
    return BuildSettings(**{**base, **kw})  # type: ignore[arg-type]


def write_yaml(path: Path, model_dir: Path, out: Path, extra: str = "") -> Path:
    path.write_text(
        f"model_dir: {model_dir}\noutput_dir: {out}\ngpu_count: 8\n"
        f"device_memory_mb: {H100_MIB}\nmax_batch_size: 16\npython: python3\n{extra}"
    )
    return path


# ---------------------------------------------------------------- settings


def test_settings_file_then_flags_win(tmp_path: Path, model_dir: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", model_dir, tmp_path / "out", "tp_size: 2\n")
    path.write_text(path.read_text() + "triton:\n  max_queue_size: 7\n")
    s = load_settings(["--settings", str(path), "--tp-size", "4", "--no-triton.decoupled"])
    assert (s.tp_size, s.triton.max_queue_size, s.triton.decoupled) == (4, 7, False)


def test_settings_toml(tmp_path: Path, model_dir: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        f'model_dir = "{model_dir}"\noutput_dir = "{tmp_path}"\ntp_size = 2\n'
        "[triton]\nqueue_timeout_ms = 500\n"
    )
    s = load_settings(["--settings", str(path)])
    assert (s.tp_size, s.triton.queue_timeout_ms) == (2, 500)


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ("bogus: 1\n", "bogus", ["Extra inputs are not permitted"]),
        ("max_input_len: 9000\n", "max_seq_len", ["max_seq_len=8192", "max_input_len=9000"]),
        ("tp_size: 0\n", "tp_size", ["greater than or equal to 1"]),
        ("serving: llmapi\nquantization: int8_wo\n", "quantization", ["engine path only"]),
        (
            "tp_size: 2\ntriton:\n  gpu_device_ids: [0, 1, 2]\n",
            "triton",
            ["gpu_device_ids has 3 entries", "tp_size×pp_size = 2"],
        ),
        ("triton:\n  gpu_device_ids: [1, 1]\n", "triton.gpu_device_ids", ["distinct"]),
    ],
)
def test_invalid_settings_exit_2_naming_the_field(
    tmp_path: Path,
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    extra: str,
    field: str,
    words: list[str],
) -> None:
    path = write_yaml(tmp_path / "s.yaml", model_dir, tmp_path / "out", extra)
    assert main(["--settings", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"triage build-engine: invalid setting {field}:" in err
    for word in words:
        assert word in err


def test_missing_settings_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--settings", str(tmp_path / "nope.yaml")]) == 2
    assert "invalid setting settings: settings file" in capsys.readouterr().err


def test_missing_config_json_names_model_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_yaml(tmp_path / "s.yaml", tmp_path / "empty", tmp_path / "out")
    assert main(["--settings", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "invalid setting model_dir:" in err and "config.json not found" in err


# ---------------------------------------------------------------- model shape and memory


def test_model_shape_and_parameter_count() -> None:
    shape = ModelShape.from_config(LLAMA_8B)
    assert (shape.head_dim, shape.num_key_value_heads) == (128, 8)
    assert shape.parameter_count() == 8_030_261_248
    no_gqa = ModelShape.from_config(
        {k: v for k, v in LLAMA_8B.items() if k != "num_key_value_heads"}
    )
    assert no_gqa.num_key_value_heads == 32


def test_model_shape_names_missing_fields() -> None:
    with pytest.raises(ModelShapeError, match="num_attention_heads, hidden_size"):
        ModelShape.from_config({"vocab_size": 10})


def test_memory_estimate_by_hand(model_dir: Path, tmp_path: Path) -> None:
    shape = ModelShape.from_model_dir(model_dir)
    one = estimate_memory(make_settings(model_dir, tmp_path, max_batch_size=64), shape)
    # KV: 2 (K,V) × 32 layers × 8 KV heads × 128 × 64 sequences × 8192 tokens × 2 bytes
    assert one.kv_cache_mb == 2 * 32 * 8 * 128 * 64 * 8192 * 2 / 2**20 == 65536
    assert 15_200 < one.weights_mb < 15_400  # 8.03 B × 2 bytes
    two = estimate_memory(make_settings(model_dir, tmp_path, max_batch_size=64, tp_size=2), shape)
    assert two.kv_cache_mb == 32768
    assert two.weights_mb < one.weights_mb * 0.55
    int4 = estimate_memory(make_settings(model_dir, tmp_path, quantization="int4_wo"), shape)
    assert int4.weights_mb < one.weights_mb * 0.35
    assert one.runtime_mb == 2048


# ---------------------------------------------------------------- plan validation


def plan_problems(settings: BuildSettings, gpus: list[GpuInfo] | None = None) -> list[str]:
    with pytest.raises(PlanError) as info:
        make_plan(settings, ModelShape.from_model_dir(settings.model_dir), gpus)
    return [str(p) for p in info.value.problems]


def test_tp_must_divide_heads_and_kv_heads(model_dir: Path, tmp_path: Path) -> None:
    problems = plan_problems(make_settings(model_dir, tmp_path, tp_size=3))
    assert any("tp_size=3 does not divide num_attention_heads=32" in p for p in problems)
    assert any("tp_size=3 does not divide num_key_value_heads=8" in p for p in problems)
    problems = plan_problems(make_settings(model_dir, tmp_path, tp_size=16, gpu_count=16))
    assert problems == [p for p in problems if p.startswith("tp_size:")]
    assert len(problems) == 1 and "num_key_value_heads=8" in problems[0]


def test_too_little_memory_names_field_and_numbers(model_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(model_dir, tmp_path, max_batch_size=64)
    (problem,) = plan_problems(settings)
    assert problem.startswith("device_memory_mb: the plan needs ~83,6")
    for part in ("KV cache 65,536", "max_batch_size=64", "max_seq_len=8192", "81,559 MiB"):
        assert part in problem
    assert "raise tp_size" in problem
    # the same plan fits with TP=2
    make_plan(
        make_settings(model_dir, tmp_path, max_batch_size=64, tp_size=2),
        ModelShape.from_model_dir(model_dir),
        None,
    )


def test_nvidia_smi_wins_over_settings(model_dir: Path, tmp_path: Path) -> None:
    small = [GpuInfo(0, "NVIDIA L4", 22_491, "550.54")]
    (problem,) = plan_problems(make_settings(model_dir, tmp_path), small)
    assert "22,491 MiB (nvidia-smi: NVIDIA L4)" in problem


def test_gpu_count_and_unknown_devices(model_dir: Path, tmp_path: Path) -> None:
    (problem,) = plan_problems(make_settings(model_dir, tmp_path, tp_size=4, gpu_count=2))
    assert (
        problem == "tp_size: tp_size×pp_size = 4×1 = 4 GPUs per replica, but 2 available (settings)"
    )
    problems = plan_problems(
        make_settings(model_dir, tmp_path, gpu_count=None, device_memory_mb=None)
    )
    assert [p.split(":")[0] for p in problems] == ["gpu_count", "device_memory_mb"]
    assert "nvidia-smi not found" in problems[0]
    ids = make_settings(
        model_dir, tmp_path, tp_size=2, gpu_count=2, triton={"gpu_device_ids": [1, 2]}
    )
    assert plan_problems(ids)[0].startswith("triton.gpu_device_ids: [1, 2] names a GPU")


def test_length_problems_and_all_problems_at_once(model_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(
        model_dir,
        tmp_path,
        tp_size=3,
        max_num_tokens=1024,
        max_seq_len=200_000,
        triton={"enable_chunked_context": False},
    )
    fields = [p.split(":")[0] for p in plan_problems(settings)]
    assert fields[:4] == ["tp_size", "tp_size", "max_num_tokens", "max_seq_len"]


def test_valid_plan_describes_itself(model_dir: Path, tmp_path: Path) -> None:
    plan = make_plan(
        make_settings(model_dir, tmp_path, tp_size=2),
        ModelShape.from_model_dir(model_dir),
        None,
    )
    text = "\n".join(plan.describe())
    assert "8.03 B parameters" in text and "tp_size=2 pp_size=1 -> 2 GPU(s) [0, 1]" in text


# ---------------------------------------------------------------- exact commands (dry run)


def expected_commands(model_dir: Path, out: Path, tp: int) -> list[list[str]]:
    return [
        [
            "python3",
            "-m",
            "build_engines.convert_checkpoint",
            "--model_dir",
            str(model_dir),
            "--output_dir",
            str(out / "checkpoint"),
            "--dtype",
            "bfloat16",
            "--tp_size",
            str(tp),
            "--pp_size",
            "1",
        ],
        [
            "trtllm-build",
            "--checkpoint_dir",
            str(out / "checkpoint"),
            "--output_dir",
            str(out / "engine"),
            "--max_batch_size",
            "16",
            "--max_input_len",
            "4096",
            "--max_seq_len",
            "8192",
            "--max_num_tokens",
            "8192",
            "--max_beam_width",
            "1",
            "--kv_cache_type",
            "paged",
            "--gemm_plugin",
            "auto",
            "--remove_input_padding",
            "enable",
            "--use_paged_context_fmha",
            "enable",
        ],
    ]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_dry_run_prints_the_exact_commands(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], tp: int
) -> None:
    out = tmp_path / "out"
    path = write_yaml(tmp_path / "s.yaml", model_dir, out)
    assert main(["--settings", str(path), "--tp-size", str(tp), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    expected = expected_commands(model_dir, out, tp)
    assert [
        s.argv for s in build_steps(load_settings(["--settings", str(path), "--tp-size", str(tp)]))
    ] == expected
    for argv in expected:
        assert f"  {shlex.join(argv)}\n" in printed
    assert f"--world-size {tp}" in printed
    assert printed.count("tritonserver --model-repository") == tp
    assert not out.exists()  # a dry run writes nothing


def test_quantization_and_convert_script_flags(model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "TensorRT-LLM/examples/models/core/llama/convert_checkpoint.py"
    s = make_settings(model_dir, tmp_path, quantization="int4_wo", convert_script=script, pp_size=2)
    convert = build_steps(s)[0].argv
    assert convert[:2] == ["python3", str(script)]
    assert convert[-5:] == [
        "--pp_size",
        "2",
        "--use_weight_only",
        "--weight_only_precision",
        "int4",
    ]
    s8 = make_settings(model_dir, tmp_path, quantization="int8_wo")
    assert build_steps(s8)[0].argv[-3:] == ["--use_weight_only", "--weight_only_precision", "int8"]


def test_llmapi_has_no_build_step_and_prints_model_yaml(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_yaml(tmp_path / "s.yaml", model_dir, tmp_path / "out", "serving: llmapi\n")
    assert main(["--settings", str(path), "--tp-size", "2", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "commands: none (LLM-API path: no build step)" in printed
    assert "  tensor_parallel_size: 2\n" in printed and "  backend: pytorch\n" in printed
    assert "--max-active 16" in printed and "mpirun" not in printed


def test_launch_hint_parses_to_the_launcher_command(model_dir: Path, tmp_path: Path) -> None:
    for serving in ("engine", "llmapi"):
        s = make_settings(model_dir, tmp_path, tp_size=2, serving=serving)
        hint = shlex.split(launch_hint(s))[3:]
        parsed = TpReplicaSettings.model_validate(
            {hint[i].lstrip("-").replace("-", "_"): hint[i + 1] for i in range(0, len(hint), 2)}
        )
        assert launch_argv(parsed) == launch_argv(launch_settings(s))


def test_triage_cli_knows_build_engine(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--help"]) == 0
    assert "build-engine" in capsys.readouterr().out
    path = write_yaml(tmp_path / "s.yaml", model_dir, tmp_path / "out")
    assert cli.main(["build-engine", "--settings", str(path), "--dry-run"]) == 0
    assert cli.main(["build-engine", "--settings", str(path), "--tp-size", "3", "--dry-run"]) == 2
    assert "invalid plan: tp_size: tp_size=3" in capsys.readouterr().err


# ---------------------------------------------------------------- the build run (stand-in tools)


FAKE_PYTHON = """#!/bin/sh
# stands in for an interpreter with tensorrt-llm: answers the version probe, runs scripts
if [ "$1" = "-c" ]; then echo "@VERSION@"; exit 0; fi
exec @PYTHON@ "$@"
"""
FAKE_CONVERT = """
import argparse, json, pathlib
p = argparse.ArgumentParser()
for flag in ("--model_dir", "--output_dir", "--dtype", "--tp_size", "--pp_size"):
    p.add_argument(flag)
a = p.parse_args()
out = pathlib.Path(a.output_dir); out.mkdir(parents=True)
world = int(a.tp_size) * int(a.pp_size)
(out / "config.json").write_text(json.dumps({"mapping": {"world_size": world}}))
for rank in range(world):
    (out / f"rank{rank}.safetensors").write_bytes(bytes([rank]) * 32)
    print(f"rank {rank + 1}/{world} converted", flush=True)
"""
FAKE_BUILD = """#!@PYTHON@
import sys, pathlib, json, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
src, out = pathlib.Path(args["--checkpoint_dir"]), pathlib.Path(args["--output_dir"])
world = json.loads((src / "config.json").read_text())["mapping"]["world_size"]
out.mkdir(parents=True)
(out / "config.json").write_text(json.dumps({"build_config": {"max_batch_size": int(args["--max_batch_size"])}}))
for rank in range(world):
    (out / f"rank{rank}.engine").write_bytes(b"engine" + bytes([rank]))
    print(f"[TRT-LLM] built rank {rank}", flush=True)
time.sleep(@SLEEP@)
sys.exit(@CODE@)
"""


def executable(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_tools(
    tmp_path: Path, version: str = "1.2.1", code: int = 0, sleep: float = 0
) -> dict[str, str]:
    def fill(template: str) -> str:
        values = {"@VERSION@": version, "@PYTHON@": sys.executable, "@CODE@": str(code)}
        for key, value in {**values, "@SLEEP@": str(sleep)}.items():
            template = template.replace(key, value)
        return template

    python = executable(tmp_path / "python", fill(FAKE_PYTHON))
    convert = tmp_path / "convert_checkpoint.py"
    convert.write_text(FAKE_CONVERT)
    build = executable(tmp_path / "trtllm-build", fill(FAKE_BUILD))
    return {"python": str(python), "convert_script": str(convert), "trtllm_build": str(build)}


def build_argv(tmp_path: Path, model_dir: Path, tools: dict[str, str], *extra: str) -> list[str]:
    path = write_yaml(tmp_path / "s.yaml", model_dir, tmp_path / "out", "tp_size: 2\n")
    argv = ["--settings", str(path)]
    for key, value in tools.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return [*argv, *extra]


def test_build_runs_steps_writes_repository_and_manifest(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(build_argv(tmp_path, model_dir, fake_tools(tmp_path))) == 0
    printed = capsys.readouterr().out
    assert "[1/2] convert_checkpoint" in printed and "[2/2] trtllm-build" in printed
    out = tmp_path / "out"
    assert "rank 2/2 converted" in (out / "logs" / "convert_checkpoint.log").read_text()
    assert "built rank 1" in (out / "logs" / "trtllm-build.log").read_text()
    for model in ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing"):
        config = text_format.Parse(
            (out / "triton_repo" / model / "config.pbtxt").read_text(),
            model_config_pb2.ModelConfig(),
        )
        assert config.name == model
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["tensorrt_llm"] == "1.2.1"
    assert manifest["versions"]["tensorrt_llm_required"] == ">=1.2,<1.3"
    assert manifest["parallelism"] == {
        "tp_size": 2,
        "pp_size": 1,
        "world_size": 2,
        "gpu_device_ids": [0, 1],
    }
    engine = manifest["engine"]
    assert engine["config"] == {"build_config": {"max_batch_size": 16}}
    digest = hashlib.sha256((out / "engine" / "rank1.engine").read_bytes()).hexdigest()
    assert engine["files"]["rank1.engine"] == {"bytes": 7, "sha256": digest}
    model_files = manifest["model"]["files"]
    assert "sha256" in model_files["config.json"]
    assert model_files["model-00001-of-00001.safetensors"] == {"bytes": 64}  # weights: size only
    assert [c["name"] for c in manifest["commands"]] == ["convert_checkpoint", "trtllm-build"]
    assert all(c["seconds"] is not None for c in manifest["commands"])
    assert "tensorrt_llm/config.pbtxt" in manifest["repository"]["files"]
    assert manifest["settings"]["tp_size"] == 2 and manifest["memory_estimate_mb"]["total_mb"] > 0


def test_failed_step_exit_1_with_log_tail(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(build_argv(tmp_path, model_dir, fake_tools(tmp_path, code=3))) == 1
    err = capsys.readouterr().err
    assert "trtllm-build failed with exit code 3" in err
    assert str(tmp_path / "out" / "logs" / "trtllm-build.log") in err
    assert "built rank 1" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("version", "words"),
    [("", "tensorrt-llm is not installed"), ("1.3.0", "tensorrt-llm 1.3.0 in")],
)
def test_engine_path_is_pinned_to_1_2(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], version: str, words: str
) -> None:
    assert main(build_argv(tmp_path, model_dir, fake_tools(tmp_path, version=version))) == 2
    err = capsys.readouterr().err
    assert "invalid plan: python:" in err and words in err and ">=1.2,<1.3" in err
    assert not (tmp_path / "out" / "logs").exists()  # nothing ran


def test_existing_engine_needs_overwrite(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tools = fake_tools(tmp_path)
    assert main(build_argv(tmp_path, model_dir, tools)) == 0
    assert main(build_argv(tmp_path, model_dir, tools)) == 2
    assert "invalid plan: overwrite:" in capsys.readouterr().err
    assert main(build_argv(tmp_path, model_dir, tools, "--overwrite")) == 0


def test_repository_only_skips_the_steps(tmp_path: Path, model_dir: Path) -> None:
    argv = build_argv(tmp_path, model_dir, {"python": "python3"}, "--repository-only")
    assert main(argv) == 0
    out = tmp_path / "out"
    assert (out / "triton_repo" / "ensemble" / "config.pbtxt").is_file()
    assert not (out / "engine").exists()
    assert json.loads((out / "manifest.json").read_text())["commands"] == []
    # what `triage build-engine` wrote is a repository the tensorrtllm backend loads: every
    # parameter it reads without a default is there (tests/fixtures/upstream/)
    assert check_engine_repository(out / "triton_repo") == []
    required = json.loads(
        (Path(__file__).parent / "fixtures" / "upstream" / "required_parameters.json").read_text()
    )
    engine = text_format.Parse(
        (out / "triton_repo" / "tensorrt_llm" / "config.pbtxt").read_text(),
        model_config_pb2.ModelConfig(),
    )
    for entry in required["required"] + required["required_in_effect"]:
        assert entry["name"] in engine.parameters, entry["name"]
    assert engine.parameters["guided_decoding_backend"].string_value == ""  # off


def test_llmapi_build_writes_repository_and_manifest(tmp_path: Path, model_dir: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", model_dir, tmp_path / "out", "serving: llmapi\n")
    assert main(["--settings", str(path), "--tp-size", "2"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["serving"] == "llmapi" and manifest["engine"] is None
    assert "tensorrt_llm/1/model.yaml" in manifest["repository"]["files"]


def test_run_step_heartbeat(tmp_path: Path, model_dir: Path) -> None:
    s = make_settings(model_dir, tmp_path, **fake_tools(tmp_path, sleep=0.4), overwrite=True)
    convert, build = build_steps(s)
    lines: list[str] = []
    run_step(convert, lines.append, heartbeat_s=10)
    result = run_step(build, lines.append, heartbeat_s=0.1)
    assert any(line.startswith("    ... trtllm-build") for line in lines)
    assert result.seconds >= 0.4


def test_run_step_failure_carries_tail(tmp_path: Path, model_dir: Path) -> None:
    convert, build = build_steps(make_settings(model_dir, tmp_path, **fake_tools(tmp_path, code=5)))
    run_step(convert, lambda _: None)
    with pytest.raises(StepFailed) as info:
        run_step(build, lambda _: None)
    assert info.value.returncode == 5
    assert "[TRT-LLM] built rank 0" in str(info.value)


# ---------------------------------------------------------------- small parts


def test_parse_nvidia_smi() -> None:
    text = (
        "0, NVIDIA H100 80GB HBM3, 81559, 550.54.15\n1, NVIDIA H100 80GB HBM3, 81559, 550.54.15\n"
    )
    gpus = parse_nvidia_smi(text)
    assert gpus[1] == GpuInfo(1, "NVIDIA H100 80GB HBM3", 81559, "550.54.15")
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        parse_nvidia_smi("garbage")


def test_query_gpus_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("build_engines.gpus.shutil.which", lambda _: None)
    assert query_gpus() is None


@pytest.mark.parametrize(
    ("version", "ok"), [("1.2.1", True), ("1.2.0rc5", True), ("1.3.0", False), ("0.21.0", False)]
)
def test_engine_path_versions(version: str, ok: bool) -> None:
    assert engine_path_supported(version) is ok


def test_convert_checkpoint_flags() -> None:
    args = convert_checkpoint.parse_args(
        [
            "--model_dir",
            "m",
            "--output_dir",
            "o",
            "--tp_size",
            "2",
            "--use_weight_only",
            "--weight_only_precision",
            "int4",
        ]
    )
    assert (args.tp_size, args.pp_size, convert_checkpoint.quant_algo_name(args)) == (2, 1, "W4A16")
    plain = convert_checkpoint.parse_args(["--model_dir", "m", "--output_dir", "o"])
    assert convert_checkpoint.quant_algo_name(plain) is None
    with pytest.raises(SystemExit):
        convert_checkpoint.parse_args(["--model_dir", "m", "--output_dir", "o", "--tp_size", "0"])


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here"
)
def test_convert_checkpoint_without_tensorrt_llm(capsys: pytest.CaptureFixture[str]) -> None:
    assert convert_checkpoint.main(["--model_dir", "m", "--output_dir", "o"]) == 1
    assert "tensorrt-llm is not installed" in capsys.readouterr().err


def test_settings_errors_are_validation_errors(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        make_settings(model_dir, tmp_path, max_input_len=8192, max_seq_len=8192)


@pytest.mark.parametrize("name", ["llama-3-8b-tp2.yaml", "llama-3-8b-tp2-llmapi.yaml"])
def test_example_settings_are_valid(name: str, tmp_path: Path, model_dir: Path) -> None:
    example = Path(__file__).parent.parent / "build_engines" / "examples" / name
    s = load_settings(["--settings", str(example), "--model-dir", str(model_dir)])
    assert (s.tp_size, s.world_size) == (2, 2)
    make_plan(s, ModelShape.from_model_dir(model_dir), None)  # fits on two 80 GB GPUs
