"""Fill the ``triton_models/tensorrt_llm`` templates from the build settings.

Every ``config.pbtxt`` goes through Triton's own protobuf (``model_config_pb2``): the template
is parsed (a typo raises ``ParseError``), the settings are set on the message, and the message
is written back, so a generated repository is always valid Triton model configuration.

* engine path: ``ensemble`` (the model clients call), ``preprocessing``, ``tensorrt_llm`` (the
  C++ backend on the engine), ``postprocessing``;
* LLM-API path: one python model (default name ``tensorrt_llm``) with ``1/model.yaml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build_engines.settings import BuildSettings
from core.paths import TRITON_MODELS

TEMPLATES = TRITON_MODELS / "tensorrt_llm"
ENGINE_TEMPLATES = TEMPLATES / "inflight_batcher_llm"
LLMAPI_TEMPLATE = TEMPLATES / "llmapi" / "tensorrt_llm"
ENSEMBLE = "ensemble"
ENGINE_MODEL = "tensorrt_llm"
ENGINE_MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")

REQUIRED_ENGINE_PARAMETERS = (
    "gpt_model_type",
    "gpt_model_path",
    "tokenizer_dir",
    "guided_decoding_backend",
    "xgrammar_tokenizer_info_path",
)
"""Parameters the C++ ``tensorrtllm`` backend reads without a default (``ModelState::
GetParameter`` outside any try/catch; ``gpt_model_path`` is read inside one, but an absent or
missing path fails the load with "Both encoder and decoder model paths are empty"). A
``tensorrt_llm`` config without one of them fails to load, and the ensemble with it. Checked
against NVIDIA's sources: ``tests/fixtures/upstream/required_parameters.json``."""

GUIDED_DECODING_OFF = {"guided_decoding_backend": "", "xgrammar_tokenizer_info_path": ""}
"""Empty values (or unreplaced ``${...}``) turn guided decoding off in the backend."""


class RepositoryError(ValueError):
    """A generated repository the backend would refuse to load."""


def missing_engine_parameters(config: model_config_pb2.ModelConfig) -> list[str]:
    """The required parameters a ``tensorrtllm``-backend config lacks (present but empty is
    fine: the backend only needs the key), plus an empty ``gpt_model_path``."""
    missing = [name for name in REQUIRED_ENGINE_PARAMETERS if name not in config.parameters]
    path = config.parameters.get("gpt_model_path")
    if path is not None and not path.string_value.strip():
        missing.append("gpt_model_path (empty)")
    return missing


def check_engine_repository(repository: Path) -> list[str]:
    """Problems the backend would fail the load on, one sentence each, for every model of
    ``repository`` on the ``tensorrtllm`` backend."""
    problems: list[str] = []
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = read_config(path)
        if config.backend != "tensorrtllm":
            continue
        for name in missing_engine_parameters(config):
            problems.append(
                f"{path}: parameter {name} missing; the tensorrtllm backend fails the load "
                f"('Cannot find parameter with name: {name.split()[0]}')"
            )
    return problems


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def write_config(config: model_config_pb2.ModelConfig, path: Path) -> None:
    path.write_text(text_format.MessageToString(config))


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _ids(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def _set_parameters(config: model_config_pb2.ModelConfig, values: dict[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value


def _set_queue_policy(config: model_config_pb2.ModelConfig, settings: BuildSettings) -> None:
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = settings.triton.max_queue_size
    policy.timeout_action = model_config_pb2.ModelQueuePolicy.REJECT
    timeout_ms = settings.triton.queue_timeout_ms
    if timeout_ms is None:
        policy.ClearField("default_timeout_microseconds")
    else:
        policy.default_timeout_microseconds = timeout_ms * 1000


def _copy_template(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (target / "1").mkdir(exist_ok=True)  # Triton needs a version folder, even an empty one


def engine_configs(settings: BuildSettings) -> dict[str, model_config_pb2.ModelConfig]:
    """The four configs of the engine path, filled from ``settings`` (pure: no files written)."""
    t = settings.triton
    batch = settings.max_batch_size
    configs = {
        name: read_config(ENGINE_TEMPLATES / name / "config.pbtxt") for name in ENGINE_MODELS
    }
    for config in configs.values():
        config.max_batch_size = batch
    tokenizer = str(settings.tokenizer_path)
    pre, post, engine = configs["preprocessing"], configs["postprocessing"], configs[ENGINE_MODEL]
    _set_parameters(
        pre, {"tokenizer_dir": tokenizer, "add_special_tokens": _flag(t.add_special_tokens)}
    )
    pre.instance_group[0].count = t.preprocessing_instances
    _set_parameters(
        post, {"tokenizer_dir": tokenizer, "skip_special_tokens": _flag(t.skip_special_tokens)}
    )
    post.instance_group[0].count = t.postprocessing_instances
    engine.model_transaction_policy.decoupled = t.decoupled
    _set_parameters(
        engine,
        {
            "gpt_model_type": "inflight_fused_batching",
            "gpt_model_path": str(settings.engine_dir),
            "batch_scheduler_policy": t.batch_scheduler_policy,
            "kv_cache_free_gpu_mem_fraction": str(t.kv_cache_free_gpu_mem_fraction),
            "enable_chunked_context": _flag(t.enable_chunked_context),
            "enable_kv_cache_reuse": _flag(t.enable_kv_cache_reuse),
            "exclude_input_in_output": _flag(t.exclude_input_in_output),
            "max_beam_width": str(t.max_beam_width),
            "gpu_device_ids": _ids(settings.device_ids),
            "executor_worker_path": t.executor_worker_path,
            "tokenizer_dir": tokenizer,
            **GUIDED_DECODING_OFF,
        },
    )
    if t.participant_ids is not None:
        _set_parameters(engine, {"participant_ids": _ids(t.participant_ids)})
    for config in (pre, engine, post):
        _set_queue_policy(config, settings)
    return configs


def llmapi_config(settings: BuildSettings) -> model_config_pb2.ModelConfig:
    config = read_config(LLMAPI_TEMPLATE / "config.pbtxt")
    config.name = settings.triton.llmapi_model_name
    config.max_batch_size = settings.max_batch_size
    config.model_transaction_policy.decoupled = settings.triton.decoupled
    _set_queue_policy(config, settings)
    _set_parameters(
        config,
        {
            "gpu_device_ids": _ids(settings.device_ids),
            "max_active": str(settings.max_batch_size),
            "engine_queue_size": str(settings.triton.max_queue_size),
        },
    )
    return config


def llmapi_model_yaml(settings: BuildSettings) -> dict[str, Any]:
    """``model.yaml``: the template's keys, with the values of ``settings``."""
    data: dict[str, Any] = yaml.safe_load((LLMAPI_TEMPLATE / "1" / "model.yaml").read_text())
    t = settings.triton
    data.update(
        {
            "model": str(settings.model_path),
            "tokenizer": str(settings.tokenizer_path),
            "backend": "pytorch",
            "dtype": settings.dtype,
            "tensor_parallel_size": settings.tp_size,
            "pipeline_parallel_size": settings.pp_size,
            "max_batch_size": settings.max_batch_size,
            "max_input_len": settings.max_input_len,
            "max_seq_len": settings.max_seq_len,
            "max_num_tokens": settings.max_num_tokens,
            "enable_chunked_prefill": t.enable_chunked_context,
            "kv_cache_config": {
                "free_gpu_memory_fraction": t.kv_cache_free_gpu_mem_fraction,
                "enable_block_reuse": t.enable_kv_cache_reuse,
            },
            "triton_config": {"max_batch_size": settings.max_batch_size, "decoupled": t.decoupled},
        }
    )
    return data


def write_engine_repository(settings: BuildSettings) -> Path:
    dest = settings.repository_dir
    dest.mkdir(parents=True, exist_ok=True)
    for name, config in engine_configs(settings).items():
        _copy_template(ENGINE_TEMPLATES / name, dest / name)
        write_config(config, dest / name / "config.pbtxt")
    problems = check_engine_repository(dest)
    if problems:
        raise RepositoryError("; ".join(problems))
    return dest


def write_llmapi_repository(settings: BuildSettings) -> Path:
    dest = settings.repository_dir
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / settings.triton.llmapi_model_name
    _copy_template(LLMAPI_TEMPLATE, target)
    write_config(llmapi_config(settings), target / "config.pbtxt")
    body = yaml.safe_dump(llmapi_model_yaml(settings), sort_keys=False)
    (target / "1" / "model.yaml").write_text(
        "# tensorrt_llm.LLM arguments, written by triage build-engine\n" + body
    )
    return dest


def write_repository(settings: BuildSettings) -> Path:
    if settings.serving == "engine":
        return write_engine_repository(settings)
    return write_llmapi_repository(settings)


def routed_model(settings: BuildSettings) -> str:
    """The Triton model the gateway sends requests to."""
    return ENSEMBLE if settings.serving == "engine" else settings.triton.llmapi_model_name


def engine_model(settings: BuildSettings) -> str:
    """The model whose metrics carry the engine's load (``nv_trt_llm_*`` on the engine path)."""
    return ENGINE_MODEL if settings.serving == "engine" else settings.triton.llmapi_model_name
